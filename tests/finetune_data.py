"""Synthetic NER data for the fine-tuning tests: templates filled from name lists, BIO tags.

Four entity types (PER, LOC, ORG, DATE), one- to four-word entities, adjacent entities of one
type ("X and Y" makes B- after I- matter), sentences without entities. The held-out split draws
every entity from pools disjoint from training (first/last names, cities, organisation stems,
years), so no held-out entity string occurs in training, and about half of its sentences come
from templates training never uses: a tagger must use context and its pretrained knowledge, not
memorise names or sentence frames.

    python -m tests.finetune_data OUT_DIR [--train N] [--dev N] [--seed S]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Dict, List, Tuple

FIRST = {
    "train": "James Mary Robert Linda Michael Susan William Karen David Nancy Richard Lisa Joseph Betty Thomas "
             "Sandra Charles Ashley Daniel Emily Matthew Donna Anthony Carol Mark Ruth Paul Sharon Steven Laura "
             "Andrew Sarah Kevin Anna Brian Helen George Amy Edward Maria".split(),
    "heldout": "Oliver Sophie Henry Chloe Samuel Grace Lucas Hannah Nathan Julia Victor Alice Simon Clara Peter "
               "Rachel Felix Emma Walter Irene".split(),
}
LAST = {
    "train": "Smith Johnson Williams Brown Jones Garcia Miller Davis Wilson Anderson Taylor Thomas Moore Jackson "
             "Martin Lee Thompson White Harris Clark Lewis Robinson Walker Young Allen King Wright Scott Green "
             "Baker Adams Nelson Hill Campbell Mitchell Roberts Carter Phillips Evans Turner".split(),
    "heldout": "Parker Collins Edwards Stewart Morris Murphy Cook Rogers Morgan Hayes Peterson Bailey Reed Kelly "
               "Howard Ward Cox Richardson Wood Watson".split(),
}
CITY = {
    "train": ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Lisbon", "Oslo",
              "Chicago", "Boston", "Denver", "Seattle", "Houston", "Toronto", "Sydney", "Tokyo", "Cairo", "Nairobi",
              "New York", "Los Angeles", "San Francisco", "Hong Kong", "Buenos Aires", "Mexico City",
              "Amsterdam", "Brussels", "Warsaw", "Athens"],
    "heldout": ["Munich", "Milan", "Stockholm", "Helsinki", "Budapest", "Atlanta", "Dallas", "Miami", "Montreal",
                "Melbourne", "Osaka", "Lagos", "Rio de Janeiro", "Cape Town", "Las Vegas"],
}
ORG_STEM = {
    "train": ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Cyberdyne", "Soylent", "Vandelay",
              "Wonka", "Tyrell", "Hooli", "Massive Dynamic", "Blue Sun", "Oscorp", "Gringotts", "Monarch",
              "Pied Piper", "Aperture", "Black Mesa", "Nakatomi", "Gekko", "Dunder Mifflin", "Sterling Cooper",
              "Prestige"],
    "heldout": ["Vertex", "Zenith", "Polaris", "Orion", "Quantum", "Summit", "Redwood", "Silverline",
                "Northwind", "Bluebird", "Ironclad", "Evergreen"],
}
ORG_SUFFIX = ["Corp", "Inc", "Group", "Industries", "Labs", "Bank", "Systems", "Holdings"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
YEARS = {"train": [str(y) for y in range(1950, 2000)], "heldout": [str(y) for y in range(2001, 2031)]}

TEMPLATES = [
    "{PER} was born in {LOC} on {DATE} .",
    "{PER} joined {ORG} in {DATE} .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} and {PER} met in {LOC} last week .",
    "According to {PER} , {ORG} will hire more engineers .",
    "The board of {ORG} met in {LOC} on {DATE} .",
    "{PER} moved from {LOC} to {LOC} in {DATE} .",
    "Shares of {ORG} fell sharply after the report .",
    "{ORG} and {ORG} announced a merger on {DATE} .",
    "Yesterday {PER} gave a talk about climate policy .",
    "The conference in {LOC} starts on {DATE} .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "Flights between {LOC} and {LOC} were cancelled .",
    "In {DATE} , {PER} became chief executive of {ORG} .",
    "Police in {LOC} are looking for witnesses .",
    "The contract was signed by {PER} on behalf of {ORG} .",
    "She said the weather had been terrible all week .",
    "Prices rose again and nobody knows why .",
    "{PER} told reporters that the deal was fair .",
    "Tourists keep coming back to {LOC} every summer .",
]
# Contexts only the held-out split uses: the tagger must generalise past the training templates too.
HELDOUT_TEMPLATES = [
    "Last month {PER} sold her stake in {ORG} .",
    "{ORG} reported record profits for {DATE} .",
    "After years in {LOC} , {PER} returned home .",
    "Negotiations between {ORG} and unions in {LOC} collapsed .",
    "Critics praised the new novel by {PER} and {PER} .",
    "The museum in {LOC} reopened on {DATE} after repairs .",
]


def _entity(kind: str, split: str, rng: random.Random) -> List[str]:
    if kind == "PER":
        first = rng.choice(FIRST[split])
        return [first] if rng.random() < 0.2 else [first, rng.choice(LAST[split])]
    if kind == "LOC":
        return rng.choice(CITY[split]).split()
    if kind == "ORG":
        return rng.choice(ORG_STEM[split]).split() + [rng.choice(ORG_SUFFIX)]
    year = rng.choice(YEARS[split])
    style = rng.randrange(3)
    if style == 0:
        return [year]
    if style == 1:
        return [rng.choice(MONTHS), year]
    return [rng.choice(MONTHS), str(rng.randint(1, 28)), ",", year]


def sentence(split: str, rng: random.Random) -> Tuple[List[str], List[str]]:
    """One (words, BIO tags) from a random template."""
    words: List[str] = []
    tags: List[str] = []
    templates = TEMPLATES + HELDOUT_TEMPLATES * 3 if split == "heldout" else TEMPLATES  # about half unseen
    for token in rng.choice(templates).split():
        if token.startswith("{") and token.endswith("}"):
            kind = token[1:-1]
            entity = _entity(kind, split, rng)
            words += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            words.append(token)
            tags.append("O")
    return words, tags


def generate(n: int, split: str, seed: int) -> List[Tuple[List[str], List[str]]]:
    rng = random.Random(f"{split}-{seed}")
    return [sentence(split, rng) for _ in range(n)]


def write_conll(sentences, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("-DOCSTART- O\n\n")
        for words, tags in sentences:
            f.writelines(f"{w} {t}\n" for w, t in zip(words, tags))
            f.write("\n")
    return path


def write_pairs_tsv(sentences, path: Path) -> Path:
    """MRPC-layout TSV of sentence pairs: label 1 when b repeats a, 0 when b is another sentence."""
    rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for k, (words, _) in enumerate(sentences):
        other = sentences[(k + 5) % len(sentences)][0] if k % 2 == 0 else words
        rows.append(f"{k % 2}\t{k}\t{k + 1000}\t{' '.join(words)}\t{' '.join(other)}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_dataset(out_dir, n_train: int = 400, n_dev: int = 150, seed: int = 0) -> Dict[str, Path]:
    """train/dev.conll (training / held-out pools) and train/dev.tsv (pairs of the same sentences)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = generate(n_train, "train", seed), generate(n_dev, "heldout", seed)
    return {"train": write_conll(train, out / "train.conll"), "dev": write_conll(dev, out / "dev.conll"),
            "train_tsv": write_pairs_tsv(train, out / "train.tsv"), "dev_tsv": write_pairs_tsv(dev, out / "dev.tsv")}


def entity_strings(path) -> set:
    """(type, text) of every entity in a BIO CoNLL file (to check that the splits are disjoint)."""
    found, current, kind = set(), [], None
    for line in list(Path(path).read_text(encoding="utf-8").splitlines()) + [""]:
        cols = line.split()
        tag = cols[-1] if cols and cols[0] != "-DOCSTART-" else "O"
        if current and not tag.startswith("I-"):
            found.add((kind, " ".join(current)))
            current = []
        if tag.startswith("B-"):
            current, kind = [cols[0]], tag[2:]
        elif tag.startswith("I-"):
            current.append(cols[0])
    return found


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--dev", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_dataset(a.out_dir, a.train, a.dev, a.seed))
