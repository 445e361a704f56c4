"""bert-score 0.1.2 (2019): BERTScore P/R/F1 of candidate/reference pairs in one padded batch.

Its greedy matching divides every token vector by its norm and then masks, so it reads the
encoder's values at padded positions. Idf weighting on (its default), 4 layers.
"""
from _common import SENTENCES, float64_by_default, parse_args, save, seed

import bert_score
from bert_score import utils


def main():
    args = parse_args()
    float64_by_default(args)
    seed()
    utils.bert_types.append(args.model)  # accept a local model directory as the `bert` argument
    refs = SENTENCES
    cands = [s.replace("the", "a").replace("The", "One") for s in SENTENCES[::-1]]
    P, R, F = bert_score.score(cands, refs, bert=args.model, num_layers=4)
    p_noidf, r_noidf, f_noidf = bert_score.score(cands, refs, bert=args.model, num_layers=6, no_idf=True, batch_size=3)
    save(args.out, {"P": P, "R": R, "F": F, "P_noidf": p_noidf, "R_noidf": r_noidf, "F_noidf": f_noidf})


if __name__ == "__main__":
    main()
