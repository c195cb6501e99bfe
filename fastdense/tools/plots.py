"""PNG plots of a benchmark result: throughput, peak memory and roofline fraction against batch size."""

from __future__ import annotations


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, rows = result["plan"], result["rows"]
    panels = [("images_per_s", "images/s"), ("peak_mem_mb", "extra peak memory (MiB)")]
    if any("roofline_fraction" in r for r in rows):
        panels.append(("roofline_fraction", "fraction of roofline floor"))
    modes = plan["modes"]
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(5 * len(panels), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for provider in plan["providers"]:
                points = sorted(
                    (r["batch"], r[key]) for r in rows if r["provider"] == provider and r["mode"] == mode and key in r
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=provider)
            ax.set_title(f"{mode}: {label}")
            if not ax.lines:
                ax.text(0.5, 0.5, "not measured for this mode", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            if len(plan["batches"]) > 1:
                ax.set_xscale("log", base=2)
            ax.set_xticks(plan["batches"], [str(b) for b in plan["batches"]])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    device = rows[0]["device_name"]
    fig.suptitle(f"{plan['model']}, {plan['resolution']}x{plan['resolution']}, {plan['dtype']}, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
