"""Text tower at full context length vs cut to the longest real prompt, full size, alone.

CLIP-style (causal, EOT-pooled; QuiltNet/CLIP/PLIP, 77 tokens) and BERT-style (masked,
[CLS]-pooled; BiomedCLIP, 256 tokens) towers with random weights at their published sizes,
one training step (forward and backward to the context) each. Prompts are CoOp's: 16 context
tokens + one of 9 tissue class names. The same rows are part of ``python -m benchmarks``.

    python -m benchmarks.text_truncation [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks.common import FULL, Models, workspace
from benchmarks.rows import table, text_cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = replace(FULL, repeats=args.repeats)
    with workspace() as tmp:
        models = Models(torch.device("cpu"), True, tmp)
        print(table([text_cut(models, kind, sizes) for kind in ("b32", "bert")]))


if __name__ == "__main__":
    main()
