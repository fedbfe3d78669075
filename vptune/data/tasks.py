"""The 19 VTAB-1k tasks, their class counts and groups, and the VTAB-1k split names."""

from __future__ import annotations

from vptune.errors import VptuneError

NATURAL, SPECIALIZED, STRUCTURED = "Natural", "Specialized", "Structured"
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)

# name -> (num_classes, group), in the paper's order.
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar100": (100, NATURAL),
    "caltech101": (102, NATURAL),
    "dtd": (47, NATURAL),
    "oxford_flowers102": (102, NATURAL),
    "oxford_iiit_pet": (37, NATURAL),
    "svhn": (10, NATURAL),
    "sun397": (397, NATURAL),
    "patch_camelyon": (2, SPECIALIZED),
    "eurosat": (10, SPECIALIZED),
    "resisc45": (45, SPECIALIZED),
    "diabetic_retinopathy": (5, SPECIALIZED),
    "clevr_count": (8, STRUCTURED),
    "clevr_dist": (6, STRUCTURED),
    "dmlab": (6, STRUCTURED),
    "kitti_dist": (4, STRUCTURED),
    "dsprites_loc": (16, STRUCTURED),
    "dsprites_ori": (16, STRUCTURED),
    "smallnorb_azi": (18, STRUCTURED),
    "smallnorb_ele": (9, STRUCTURED),
}

# Folder names used by common VTAB-1k exports (NOAH / later PETL code) for the same tasks.
TASK_ALIASES: dict[str, str] = {
    "cifar": "cifar100",
    "caltech": "caltech101",
    "oxford_flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "patch_camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "retinopathy": "diabetic_retinopathy",
    "kitti": "kitti_dist",
    "clevr_count_all": "clevr_count",
    "clevr_closest_object_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}


def list_vtab_tasks() -> dict[str, tuple[int, str]]:
    """The 19 VTAB-1k tasks: ``name -> (num_classes, group)``."""
    return dict(VTAB_TASKS)


def canonical_task(name: str) -> str | None:
    """The VTAB-1k task a folder name stands for (aliases such as ``cifar`` or ``kitti`` included), or None."""
    key = name.strip().lower().replace("-", "_")
    if key in VTAB_TASKS:
        return key
    return TASK_ALIASES.get(key)


def task_info(name: str) -> tuple[int, str]:
    """``(num_classes, group)`` of a VTAB-1k task; :class:`VptuneError` listing the valid names if unknown."""
    key = canonical_task(name)
    if key is None:
        raise VptuneError(f"unknown VTAB-1k task {name!r}; valid tasks: {', '.join(VTAB_TASKS)}")
    return VTAB_TASKS[key]
