"""Is the needle in OmniKV's selection, step by step? A failure-analysis probe for docs/results.md.

Generates one sample of a needle task, finds the answer's tokens in the prompt, decodes greedily
through OmniKV with each selector, and prints how many needle tokens the filter layer selected at
every decode step next to the text produced.

    .venv/bin/python benchmarks/eval/needle_selection.py [--model gemma3] [--task number_string]
        [--length 2048] [--sample 0] [--budget 0.1] [--selectors last,uniform] [--steps 12]
"""

from __future__ import annotations

import argparse

import torch

from omnikv import OmniKVCache
from omnikv.hf.compat import cache_kwargs
from omnikv.eval.tasks import generate_samples
from omnikv.eval.tasks.base import encode_prompt
from omnikv.models import load_model
from omnikv.algorithm.presets import preset_for_model


def needle_positions(prompt_ids: list[int], answer_ids: list[int]) -> set[int]:
    """Positions of the first occurrence of `answer_ids` in `prompt_ids` (empty if absent)."""
    n = len(answer_ids)
    for i in range(len(prompt_ids) - n + 1):
        if prompt_ids[i : i + n] == answer_ids:
            return set(range(i, i + n))
    return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--task", default="number_string")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--samples", type=int, default=3, help="samples generated (fixes the needle depths)")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--selectors", default="last,uniform")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    sample = generate_samples(args.task, tok, args.length, args.samples, seed=0, haystack="narrative")[args.sample]
    ids = encode_prompt(tok, sample.prompt)
    needle = needle_positions(ids, tok(sample.answers[0], add_special_tokens=False).input_ids)
    if not needle:
        raise SystemExit(f"the answer {sample.answers[0]!r} does not appear token for token in the prompt")
    print(f"{args.task}, {len(ids)} tokens, needle tokens {min(needle)}-{max(needle)} "
          f"(depth {sample.metadata.get('depth')}), answer {sample.answers[0]!r}, budget {args.budget}")
    for selector in args.selectors.split(","):
        cache = OmniKVCache(model, preset_for_model(model).replace(budget=args.budget, selector=selector))
        generated, hits = [], []
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), logits_to_keep=1, **cache_kwargs(cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # from the prefill: full attention
            for _ in range(args.steps):
                generated.append(nxt.item())
                out = model(input_ids=nxt, logits_to_keep=1, **cache_kwargs(cache))
                selected = next(iter(cache.selected_indices().values()))[0, 0].tolist()
                hits.append(len(needle & set(selected)))
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        print(f"  {selector:>12}: {tok.decode(generated)!r}  needle tokens selected per decode step: "
              f"{hits} of {len(needle)}")


if __name__ == "__main__":
    main()
