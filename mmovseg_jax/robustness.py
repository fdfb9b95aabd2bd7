"""Robustness to clouds: mIoU over a ladder of cloud opacities, per preset and model.

    python -m mmovseg_jax.main --config configs/def.py --workdir W --mode robustness \
        --config.model.checkpoint=FUSED_MODEL --config.robustness.baseline_checkpoint=RGB_ONLY_MODEL

Each test tile's optical image gets clouds of the preset with the opacity forced to each
value of the ladder (0 = clear ... 1 = opaque); the SAR is untouched. Clouds are seeded
per tile, so every model sees the same clouds. Writes WORKDIR/robustness.json (every
score) and WORKDIR/robustness.png (mIoU against opacity, one line per model and preset).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mmovseg_jax.data import benchmarks, clouds
from mmovseg_jax.inference import Segmenter

HEADLINE = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pACC")


def clouded(preset: str, opacity: float, seed: int):
    """transform(record, index) -> the record with clouds over its RGB (uint8)."""
    params = clouds.PRESETS[preset]
    base = jax.random.key(seed)

    def transform(record: dict, index: int) -> dict:
        key = jax.random.fold_in(base, index)
        rgb, _ = clouds.add_clouds_uint8(key, record["rgb"], params, opacity=opacity)
        return {**record, "rgb": np.asarray(rgb)}

    return transform


def sweep(models: dict[str, Segmenter], setting: benchmarks.Setting, source, config: ml_collections.ConfigDict,
          workdir: Path) -> dict:
    """Scores every model under every (preset, opacity); writes the JSON table and the plot."""
    from mmovseg_jax.train.def_stage import score

    r = config.robustness
    unknown = [p for p in r.presets if p not in clouds.PRESETS]
    if unknown or not r.presets:
        raise ValueError(f"config.robustness.presets: {unknown or 'empty'}; known: {', '.join(clouds.PRESETS)}")
    bad = [o for o in r.opacities if not 0.0 <= o <= 1.0]
    if bad or not r.opacities:
        raise ValueError(f"config.robustness.opacities must be values in [0, 1], got {tuple(r.opacities)}")
    table = {"setting": setting.name, "tiles": None, "opacities": list(r.opacities), "presets": list(r.presets),
             "models": list(models), "scores": {}}
    for preset in r.presets:
        for opacity in r.opacities:
            for name, segmenter in models.items():
                scores = score(segmenter, setting, source, config, transform=clouded(preset, opacity, r.seed),
                               what=f"{name} {preset} opacity {opacity:.2f}")
                table["tiles"] = scores["tiles"]
                table["scores"].setdefault(preset, {}).setdefault(name, []).append(
                    {"opacity": opacity, **{k: scores.get(k) for k in HEADLINE}})
    if jax.process_index() == 0:
        _write(workdir / "robustness.json", json.dumps(table, indent=2) + "\n")
        plot(table, workdir / "robustness.png")
        print(format_table(table), flush=True)
    return table


def format_table(table: dict) -> str:
    """mIoU per (preset, model) row, one column per opacity."""
    head = f"{'preset':<8} {'model':<10}" + "".join(f"{o:>8.2f}" for o in table["opacities"])
    lines = ["mIoU under clouds (columns: opacity)", head]
    for preset, per_model in table["scores"].items():
        for name, rows in per_model.items():
            cells = "".join(f"{row['mIoU']:>8.1f}" if row["mIoU"] is not None else f"{'-':>8}" for row in rows)
            lines.append(f"{preset:<8} {name:<10}{cells}")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """mIoU against opacity, a line per model (colour) and preset (line style), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = ["-", "--", ":", "-."]
    for i, (preset, per_model) in enumerate(table["scores"].items()):
        for j, (name, rows) in enumerate(per_model.items()):
            ax.plot([row["opacity"] for row in rows], [row["mIoU"] for row in rows], styles[i % len(styles)],
                    marker="o", color=f"C{j}", label=f"{name} ({preset})")
    ax.set_xlabel("cloud opacity")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{table['setting']}: mIoU under synthetic clouds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
