"""``mmdiag demo``: the embedded default, end to end, with no arguments and no network."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmdiag.cli.common import ProgressBar, console, handle_errors, prepare_out_dir
from mmdiag.cli.summary import print_summary


@handle_errors
def demo(
    out: Path = typer.Option(Path("mmdiag-demo"), "--out", "-o", help="Output folder."),
    snr_db: Optional[float] = typer.Option(None, "--snr-db", help="Add noise to the audio at this SNR (about -5 balances)."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs of the demo model."),
    seed: int = typer.Option(0, "--seed", help="Seed of data noise, training and analysis."),
    overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace an earlier demo report in --out."),
) -> None:
    """Train a small audio-visual model on bundled AV-digits data and analyze it."""
    import torch

    from mmdiag.demo import next_commands, run_demo

    # the demo model is tiny: one thread avoids cross-thread stalls on small CPUs
    torch.set_num_threads(1)

    out_dir = prepare_out_dir(out, overwrite)
    console.print(f"[bold]mmdiag demo[/]: AV-digits (handwritten digits + spoken digits"
                  f"{'' if snr_db is None else f', audio at {snr_db:g} dB SNR'}), training {epochs} epochs on CPU...")
    with ProgressBar() as bar:
        report = run_demo(out_dir, snr_db=snr_db, epochs=epochs, seed=seed, progress=bar)
    print_summary(report, console, html_path=str(out_dir / "report.html"))
    console.print(f"[dim]wrote report.json, metrics.csv, report.html, plots/, model.pt, train.npz, val.npz and "
                  f"mmdiag.toml in {out_dir}[/]")
    console.print("then try:", highlight=False)
    for command in next_commands(out_dir):
        console.print(f"  {command}", highlight=False, soft_wrap=True)
