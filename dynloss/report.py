"""What a training run prints: the per-epoch progress line and the side-by-side table of ``--compare``.

Shared by ``dynloss train`` (pipelines/train.py) and the Ray-free runner (dynloss/local.py).

    python -c "from dynloss.report import final_line; print(final_line({'eval/top1': 0.8, 'train/loss': 1.2}))"
"""
from __future__ import annotations


def final_line(m: dict) -> str:
    parts = []
    for key, label, pct in (("train/loss", "loss", False), ("train/acc", "acc", True), ("meta/loss", "meta", False),
                            ("eval/top1", "top1", True), ("eval/few_shot", "few", True)):
        if key in m and m[key] == m[key]:
            parts.append(f"{label} {m[key]:.1%}" if pct else f"{label} {m[key]:.3f}")
    if "meta/trust_clean" in m:
        parts.append(f"trust clean/noisy {m['meta/trust_clean']:.3f}/{m.get('meta/trust_noisy', float('nan')):.3f}")
    return "  ".join(parts)


COMPARE_COLUMNS = (("eval/top1", "top-1"), ("eval/top5", "top-5"), ("eval/many_shot", "many"),
                   ("eval/medium_shot", "medium"), ("eval/few_shot", "few"), ("meta/trust_clean", "trust clean"),
                   ("meta/trust_noisy", "trust noisy"))


def compare_table(rows: dict[str, dict], seconds: dict[str, float]) -> str:
    """The side-by-side summary ``--compare`` prints (clean-test metrics of each loss's final epoch)."""
    cols = [(k, label) for k, label in COMPARE_COLUMNS if any(k in m for m in rows.values())]
    head = f"{'loss':<16}" + "".join(f"{label:>13}" for _, label in cols) + f"{'time (s)':>10}"
    lines = [head, "-" * len(head)]
    for loss, m in rows.items():
        cells = "".join(f"{m[k]:>13.4f}" if k in m and m[k] == m[k] else f"{'-':>13}" for k, _ in cols)
        lines.append(f"{loss:<16}{cells}{seconds[loss]:>10.0f}")
    return "\n".join(lines)
