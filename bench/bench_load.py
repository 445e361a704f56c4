"""`from_pretrained` benchmark, BERT-base: time and peak RSS, each load in a fresh subprocess.

Loaders: bert_port and HF transformers from `model.safetensors`; pytorch_pretrained_bert 0.6.2 and
bert_port from `pytorch_model.bin` (a `torch.save`d state dict). Each child imports its library,
reads its RSS (the baseline), loads, and reports the time and the peak RSS above the baseline as a
multiple of the weight bytes. Then it runs one 1x128 forward and reads every weight, reporting the
peak after each: a loader that defers reading (mmap) must not look cheaper than it is. The peak is VmHWM, not ru_maxrss:
Linux carries ru_maxrss over from the parent (which holds the weights) through fork and exec.
Files are read once beforehand (warm page cache).

    /work/venv/bin/python bench/bench_load.py          # ~2 min
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common as C  # noqa: E402

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
kind, directory = {kind!r}, {directory!r}
if kind.startswith("ours"):
    import bert_port
    load = lambda: bert_port.BertModel.from_pretrained(directory)
    fwd = lambda m, ids: m(ids, output_all_encoded_layers=False)[1]
elif kind == "hf":
    import transformers
    transformers.logging.set_verbosity_error()
    load = lambda: transformers.BertModel.from_pretrained(directory, attn_implementation="sdpa")
    fwd = lambda m, ids: m(input_ids=ids).pooler_output
else:
    import logging
    logging.disable(logging.WARNING)
    from pytorch_pretrained_bert import modeling
    load = lambda: modeling.BertModel.from_pretrained(directory)
    fwd = lambda m, ids: m(ids, output_all_encoded_layers=False)[1]

def status(field):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
t0 = time.perf_counter()
model = load().eval()
t1 = time.perf_counter()
peak_load = status("VmHWM")
with torch.inference_mode():
    out = fwd(model, torch.arange(1000, 1128).view(1, 128))
t2 = time.perf_counter()
peak_fwd = status("VmHWM")
with torch.no_grad():  # read every byte of every weight: a lazily mapped loader is now fully resident
    sum(float(p.sum()) for p in model.parameters())
print(json.dumps(dict(load_s=t1 - t0, first_fwd_s=t2 - t1, base=base, peak_load=peak_load,
                      peak_fwd=peak_fwd, peak_all=status("VmHWM"), pooled0=float(out[0, 0]))))
'''


def make_dirs(tmp: Path) -> dict:
    import torch

    import bert_port as bp

    weights = C.base_weights()
    model = bp.BertModel(C.ours_config())
    model.load_state_dict(weights)
    st = tmp / "safetensors"
    model.save_pretrained(st)  # config.json + model.safetensors, as HF writes them
    binary = tmp / "bin"
    binary.mkdir()
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "layer_norm_eps"}
    (binary / "bert_config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    nbytes = sum(v.numel() * v.element_size() for v in weights.values())
    for f in (st / "model.safetensors", binary / "pytorch_model.bin"):
        f.read_bytes()  # warm the page cache: every loader reads from memory
    return {"ours": st, "hf": st, "ours (.bin)": binary, "ppb (.bin)": binary}, nbytes


def run_child(kind: str, directory: Path, threads: int) -> dict:
    code = CHILD.format(root=str(ROOT), threads=threads, kind=kind, directory=str(directory))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = C.arg_parser(__doc__)
    p.set_defaults(reps=5)
    args = p.parse_args()
    C.setup(args.threads)
    print(C.machine())
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        dirs, nbytes = make_dirs(Path(tmp))
        kinds = list(dirs)
        print(f"weights: {nbytes / 2**20:.0f} MiB; reps={args.reps} (fresh subprocess each)\n")
        results = {k: [] for k in kinds}
        for r in range(args.reps):
            for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                results[k].append(run_child(k, dirs[k], args.threads))
    pooled = {k: round(v[0]["pooled0"], 5) for k, v in results.items()}
    assert len(set(pooled.values())) == 1, f"loaded models disagree: {pooled}"

    def med(k, field):
        return C.med([x[field] for x in results[k]])

    load = {k: [x["load_s"] for x in results[k]] for k in kinds}
    def over(k, field):
        return C.med([(x[field] - x["base"]) / nbytes for x in results[k]])

    rows = []
    for k in kinds:
        rows.append([k, C.fmt_ms(load[k]), f"{C.med(load[k]) / C.med(load['ours']):.2f}",
                     f"{(med(k, 'load_s') + med(k, 'first_fwd_s')) * 1e3:.0f}",
                     f"{over(k, 'peak_load'):.2f}×", f"{over(k, 'peak_fwd'):.2f}×", f"{over(k, 'peak_all'):.2f}×"])
    print(C.table(["loader", "load ms median (min–max)", "time / ours", "load + first 1×128 fwd ms",
                   "peak RSS − base, after load (× weights)", "… after first fwd", "… after reading all weights"],
                  rows))
    print()
    summary = [
        ("ours time ≤ 1.0× HF's (safetensors)", C.med(load["ours"]) / C.med(load["hf"]), lambda r: r <= 1.0),
        # ours builds the model for real, as ppb does (same init, same random stream): not 10x any more
        ("ppb (.bin) time / ours ≥ 1.0", C.med(load["ppb (.bin)"]) / C.med(load["ours"]), lambda r: r >= 1.0),
        ("ours peak RSS over baseline ≤ 1.15× weights (after load)", over("ours", "peak_load"), lambda r: r <= 1.15),
        ("… and after reading every weight", over("ours", "peak_all"), lambda r: r <= 1.15),
    ]
    print(C.table(["target", "measured", "met"], [(n, f"{r:.2f}", "yes" if ok(r) else "NO") for n, r, ok in summary]))


if __name__ == "__main__":
    main()
