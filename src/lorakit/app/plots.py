"""The training run's loss curve as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

def plot_losses(history: list[dict], path: Path, val_start: float | None = None) -> None:
    """Training loss per step (and a running mean) and validation loss (``val_start`` at step 0), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [h for h in history if h["loss"] is not None]  # skipped non-finite steps have no loss
    steps, loss = [h["step"] for h in trained], [h["loss"] for h in trained]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss (step)")
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss (mean of {k})")
    val = [(0, val_start)] if val_start is not None else []
    val += [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
