"""flair 0.4.2 (2019): BertEmbeddings on a batch of sentences of different lengths.

It runs BertModel on the padded batch and keeps, per word, the concatenation of the last four
layers at the word's first word piece ("first" pooling) or the mean of its pieces ("mean").
Importing flair.embeddings imports pytorch_pretrained_bert's GPT and Transformer-XL names.
"""
from _common import SENTENCES, float64_by_default, parse_args, save, seed

import torch
from flair.data import Sentence
from flair.embeddings import BertEmbeddings


def main():
    args = parse_args()
    float64_by_default(args)
    seed()
    outputs = {}
    for pooling in ("first", "mean"):
        embedder = BertEmbeddings(args.model, layers="-1,-2,-3,-4", pooling_operation=pooling)
        sentences = [Sentence(text) for text in SENTENCES]
        embedder.embed(sentences)
        for i, sentence in enumerate(sentences):
            outputs[f"{pooling}_{i}"] = torch.stack([token.embedding for token in sentence])
    save(args.out, outputs)


if __name__ == "__main__":
    main()
