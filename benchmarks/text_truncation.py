"""Text tower at full context length vs cut to the longest real prompt, full size, on CPU.

CLIP-style (causal, EOT-pooled; QuiltNet/CLIP/PLIP, 77 tokens) and BERT-style (masked,
[CLS]-pooled; BiomedCLIP, 256 tokens) towers with random weights at their published sizes.
Prompts are CoOp's: 16 context tokens + one of Kather-2016's 8 class names.

    python benchmarks/text_truncation.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from calbench.models import TokenBatch
from calbench.models.open_clip_backend import OpenClipBackend, load_open_clip, shipped_config
from calbench.prompts import PromptLearner

CLASSES = [
    "tumor epithelium",
    "simple stroma",
    "complex stroma",
    "immune cells",
    "debris",
    "normal mucosal glands",
    "adipose tissue",
    "background",
]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(vlm, full_ids: torch.Tensor, full_mask, repeats: int) -> tuple[float, float, int, int]:
    learner = PromptLearner(vlm, CLASSES, n_ctx=16, seed=0)
    cut = learner.tokens
    with torch.no_grad():
        tail = vlm.embed_tokens(full_ids[:, cut.ids.shape[1] :])
        head = torch.cat(
            [learner.token_prefix, learner.ctx.unsqueeze(0).expand(len(CLASSES), -1, -1), learner.token_suffix], dim=1
        )
        full_emb = torch.cat([head, tail], dim=1)
        full = TokenBatch(full_ids, cut.eot, full_mask)
        t_full = median_seconds(lambda: vlm.encode_embeddings(full_emb, full), repeats)
        t_cut = median_seconds(lambda: vlm.encode_embeddings(head, cut), repeats)
        diff = (vlm.encode_embeddings(full_emb, full) - vlm.encode_embeddings(head, cut)).abs().max().item()
    assert diff < 1e-4, diff
    return t_full, t_cut, full_ids.shape[1], cut.ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []

    cfg = shipped_config("quiltnet-b32")
    clip = OpenClipBackend.from_config(
        "quiltnet", dict(cfg["model_cfg"], preprocess_cfg=cfg["preprocess_cfg"]), torch.device("cpu")
    )
    prompts = [f"{' '.join(['X'] * 16)} {c}." for c in CLASSES]
    rows.append(("CLIP-style (ViT-B/32 text, 12x512)", *measure(clip, clip._tokenizer(prompts), None, args.repeats)))
    del clip

    with tempfile.TemporaryDirectory() as tmp:
        words = sorted({w for c in CLASSES for w in c.split()} | {"x", "."})
        (Path(tmp) / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
        weights = Path(tmp) / "open_clip_pytorch_model.bin"
        weights.write_bytes(b"")
        import calbench.models.open_clip_backend as ocb

        real = ocb.load_state_dict_file, ocb.load_strict
        ocb.load_state_dict_file, ocb.load_strict = (lambda path: {}), (lambda *a, **k: None)  # keep the random weights
        try:
            bert = load_open_clip("biomedclip", weights, "biomedclip", torch.device("cpu"))
        finally:
            ocb.load_state_dict_file, ocb.load_strict = real
        enc = bert._tokenizer(prompts, padding="max_length", max_length=bert.context_length, return_tensors="pt")
        rows.append(
            (
                "BERT-style (BiomedCLIP PubMedBERT, 12x768)",
                *measure(bert, enc["input_ids"], enc["attention_mask"], args.repeats),
            )
        )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {len(CLASSES)} prompts, median of {args.repeats}"
    )
    print(f"{'text tower':<44} {'full':>14} {'cut':>14} {'speed-up':>9}")
    for name, t_full, t_cut, n_full, n_cut in rows:
        print(f"{name:<44} {t_full * 1e3:8.1f} ms/{n_full:<3} {t_cut * 1e3:8.1f} ms/{n_cut:<3} {t_full / t_cut:8.1f}x")


if __name__ == "__main__":
    main()
