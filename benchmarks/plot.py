"""The README's time-to-accuracy picture, from ``make bench``'s results (9a/9f).

    .venv/bin/python -m benchmarks.plot [--results benchmarks/results.json]
                                        [--output docs/images/time-to-accuracy.png]

Test accuracy against wall time from the start of training: every federated run (a point per
round) and every centralized run (a point per epoch) of the alternations, and the 0.988 line.
Needs matplotlib (``pip install 'alliance[report]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import PROJECT_ROOT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", type=Path, default=PROJECT_ROOT / "benchmarks" / "results.json")
    p.add_argument(
        "--output", type=Path, default=PROJECT_ROOT / "docs" / "images" / "time-to-accuracy.png"
    )
    args = p.parse_args()
    results = {r["bench"]: r for r in json.loads(args.results.read_text())["results"]}
    a = results.get("9a")
    if not a or not a["details"].get("alternations"):
        raise SystemExit(f"{args.results}: no 9a alternations (run make bench with 9a)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for i, alt in enumerate(a["details"]["alternations"]):
        rounds = alt["rounds"]
        t, xs, ys = 0.0, [0.0], [None]
        for r in rounds:
            t += r["seconds"]
            xs.append(t)
            ys.append(r["accuracy"])
        label = "federated, 3 members (a point per round)" if i == 0 else None
        ax.plot(xs[1:], ys[1:], "o-", color="#1f77b4", alpha=0.8, label=label)
    for i, c in enumerate(a["details"].get("centralized") or []):
        t, xs, ys = 0.0, [], []
        for e in c["epochs"]:
            t += e["seconds"]
            xs.append(t)
            ys.append(e["accuracy"])
        label = "centralized, one process (a point per epoch)" if i == 0 else None
        ax.plot(xs, ys, "s--", color="#d62728", alpha=0.8, label=label)
    ax.axhline(0.988, color="#555555", linewidth=0.8, linestyle=":")
    ax.text(1, 0.9882, "0.988", color="#555555", fontsize=8, va="bottom")
    ax.set_xlabel("seconds from the start of training (fit + evaluation)")
    ax.set_ylabel("test accuracy (10,000 rows)")
    ax.set_ylim(0.97, 0.992)
    ax.set_xlim(left=0)
    machine = a["details"].get("cpuModel", "")
    ax.set_title(
        f"Time to accuracy, MNIST, {a['details'].get('cores')} cores {machine}", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
