"""allennlp 0.8.4 (2019): PretrainedBertIndexer + PretrainedBertEmbedder, inference and fine-tuning.

With a small `max_pieces` the indexer lays long sentences out as windows ([CLS] .. [SEP] [CLS] ..);
the embedder (its own `max_pieces` is 512) runs each sentence's windows as one row, so the short
sentences are rows of mostly padding (4 real pieces of 31). It returns every position (no offsets)
and its scalar mix reads all of them. Then a
classifier (the embedder with requires_grad, allennlp's BertPooler, a linear layer) takes three
BertAdam steps (the optimizer allennlp registers as "bert_adam") in train mode, dropout on.
"""
from _common import SENTENCES, parse_args, save, seed

import torch
from allennlp.data import Instance, Token, Vocabulary
from allennlp.data.dataset import Batch
from allennlp.data.fields import TextField
from allennlp.data.token_indexers.wordpiece_indexer import PretrainedBertIndexer
from allennlp.modules.seq2vec_encoders.bert_pooler import BertPooler
from allennlp.modules.token_embedders.bert_token_embedder import PretrainedBertEmbedder
from pytorch_pretrained_bert.optimization import BertAdam


def batch_tensors(model_dir):
    indexer = PretrainedBertIndexer(pretrained_model=model_dir, max_pieces=16, truncate_long_sequences=False)
    instances = [Instance({"tokens": TextField([Token(w) for w in s.split()], {"bert": indexer})}) for s in SENTENCES]
    batch = Batch(instances)
    batch.index_instances(Vocabulary())
    return batch.as_tensor_dict()["tokens"]


class Classifier(torch.nn.Module):
    def __init__(self, model_dir):
        super().__init__()
        self.embedder = PretrainedBertEmbedder(model_dir, requires_grad=True)
        self.pooler = BertPooler(model_dir)
        self.head = torch.nn.Linear(self.pooler.get_output_dim(), 2)

    def forward(self, tokens):
        return self.head(self.pooler(self.embedder(tokens["bert"], tokens["bert-offsets"])))


def main():
    args = parse_args()
    seed()
    tokens = batch_tensors(args.model)
    model = Classifier(args.model)
    if args.float64:  # initialized in float32 like the other runs, then widened
        model.double()
    outputs = {"ids": tokens["bert"]}
    model.eval()
    with torch.no_grad():
        outputs["every_piece"] = model.embedder(tokens["bert"])  # padded positions included
        outputs["words"] = model.embedder(tokens["bert"], tokens["bert-offsets"])
        outputs["logits_before"] = model(tokens)
    if args.float64:  # the float64 run is a reference for the inference outputs only
        return save(args.out, outputs)
    labels = torch.tensor([i % 2 for i in range(len(SENTENCES))])
    optimizer = BertAdam(model.parameters(), lr=5e-4, warmup=0.1, t_total=10)
    model.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        outputs["every_piece_after"] = model.embedder(tokens["bert"])
        outputs["logits_after"] = model(tokens)
    outputs["losses"] = torch.tensor(losses)
    save(args.out, outputs)


if __name__ == "__main__":
    main()
