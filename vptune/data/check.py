"""``vptune data check``: scan a dataset for unreadable images and bad labels, without training."""

from __future__ import annotations

from dataclasses import dataclass, field

from vptune.data import open_reader
from vptune.data.dataset import scan_unreadable
from vptune.errors import VptuneError


@dataclass
class SplitReport:
    """What a scan of one split found."""

    split: str
    images: int
    num_classes: int
    unreadable: list[str] = field(default_factory=list)  # messages naming each unreadable image
    bad_labels: int = 0  # labels outside 0..num_classes-1
    classes_present: int = 0

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.bad_labels

    def summary(self) -> str:
        return (f"{self.split}: {self.images} images, {self.classes_present}/{self.num_classes} classes present, "
                f"{len(self.unreadable)} unreadable, {self.bad_labels} labels out of range")


def check_dataset(cfg, splits: list[str] | None = None, workers: int = 2,
                  progress: bool = True) -> tuple[str, list[SplitReport]]:
    """Scan ``splits`` (default: all) of ``cfg.root``: returns ``(format, reports)``; raises nothing for
    bad images or labels (they are reported), only for a dataset that cannot be opened at all."""
    reader = open_reader(cfg)
    reports = []
    for split in splits or reader.splits:
        source, labels = reader.load(split)
        k = reader.num_classes
        rep = SplitReport(split, len(labels), k)
        rep.bad_labels = sum(1 for y in labels if not 0 <= y < k)
        rep.classes_present = len({y for y in labels if 0 <= y < k})
        rep.unreadable = [msg for _, msg in scan_unreadable(source, workers=workers, progress=progress)]
        reports.append(rep)
    return reader.format, reports


def format_reports(fmt: str, root: str, reports: list[SplitReport], max_listed: int = 20) -> str:
    """Human-readable lines for :func:`check_dataset`'s result."""
    lines = [f"{root} ({fmt})"]
    for r in reports:
        lines.append("  " + r.summary())
        lines.extend(f"    {m}" for m in r.unreadable[:max_listed])
        if len(r.unreadable) > max_listed:
            lines.append(f"    ... and {len(r.unreadable) - max_listed} more")
    return "\n".join(lines)


def raise_if_bad(root: str, reports: list[SplitReport]) -> None:
    """One :class:`VptuneError` summing up every problem found (none: returns)."""
    bad_img = sum(len(r.unreadable) for r in reports)
    bad_lab = sum(r.bad_labels for r in reports)
    if bad_img or bad_lab:
        raise VptuneError(f"{root}: {bad_img} unreadable image(s), {bad_lab} label(s) out of range "
                          "(open with skip_corrupt=True / --skip-corrupt to skip unreadable images)")
