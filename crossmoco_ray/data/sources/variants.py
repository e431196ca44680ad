"""ScanObjectNN's variants by their official file names (plain data: the CLI help and the schema use them)."""

from __future__ import annotations

# ScanObjectNN's official h5 release: {training,test}_<stem>.h5 in main_split/ (objects with their
# background) and main_split_nobg/ (objects alone). The variants the papers name, by file stem in main_split/;
# in main_split_nobg/ the same stems are the objects without background ("objectdataset" = OBJ_ONLY).
SCANOBJECTNN_STEMS = {
    "objectdataset": "obj_bg",
    "objectdataset_augmented25_norot": "pb_t25",
    "objectdataset_augmented25rot": "pb_t25_r",
    "objectdataset_augmentedrot": "pb_t50_r",
    "objectdataset_augmentedrot_scale75": "pb_t50_rs",
}
SCANOBJECTNN_VARIANTS = (
    "obj_bg",
    "obj_only",
    *(v for v in SCANOBJECTNN_STEMS.values() if v != "obj_bg"),
    *(f"{v}_nobg" for v in SCANOBJECTNN_STEMS.values() if v != "obj_bg"),
)

__all__ = ["SCANOBJECTNN_STEMS", "SCANOBJECTNN_VARIANTS"]
