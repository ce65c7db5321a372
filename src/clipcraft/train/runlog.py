"""What a run writes as it goes, from rank 0 only: messages, ``metrics.jsonl`` (one JSON object a line, each
with ``type`` and ``step``), TensorBoard scalars when tensorboard is installed, and progress bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    """Rank-0 output of a run in ``run_dir``. With ``resume_step`` the metrics logged after that step are dropped
    (the resumed run logs them again); without it an old ``metrics.jsonl`` is replaced."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.tb: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = run_dir / "metrics.jsonl"
        if resume_step is not None and self.metrics_file.is_file():
            # drop what was logged after the checkpoint: the resumed run logs those steps again
            kept = [
                line
                for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))
        elif self.metrics_file.exists():
            self.metrics_file.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write_config(self, config: Any, header: str = "") -> None:
        """Write the resolved config (a mapping, or anything with ``to_dict()``) to ``config.yaml``, after
        ``header`` as a YAML comment."""
        if self.enabled:
            import yaml

            data = dict(config) if isinstance(config, dict) else config.to_dict()
            comment = "".join(f"# {line}\n" for line in header.splitlines())
            (self.run_dir / "config.yaml").write_text(comment + yaml.safe_dump(data, sort_keys=False))

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{row['type']}/{key}", value, row["step"])
            self.tb.flush()

    def progress(self, total: int, initial: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit="step", disable=not self.enabled, dynamic_ncols=True
        )
