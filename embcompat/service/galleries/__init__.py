"""Galleries: items and their vectors per model version, filters, index publishing."""

from embcompat.service.galleries.filters import Filters, MetaValue, allowed_by
from embcompat.service.galleries.items import (
    ItemIn,
    delete_items,
    encode_and_store,
    encode_items,
    encode_staged,
    ingest,
    stage,
)
from embcompat.service.galleries.layout import (
    gallery_dir,
    gallery_lock,
    get_gallery_row,
    known_version,
    mapped_searcher,
    mapped_store,
    space_searcher,
    space_store,
    version_record,
)
from embcompat.service.galleries.probes import get_probe, probe_summary, set_probe
from embcompat.service.galleries.publish import publish, stats
from embcompat.service.galleries.records import (
    GalleryRecord,
    create_gallery,
    get_gallery,
    list_galleries,
)
from embcompat.service.galleries.repair import degraded, repair, verify

__all__ = [
    "Filters",
    "GalleryRecord",
    "ItemIn",
    "MetaValue",
    "create_gallery",
    "degraded",
    "delete_items",
    "encode_and_store",
    "encode_items",
    "encode_staged",
    "allowed_by",
    "gallery_dir",
    "gallery_lock",
    "get_gallery",
    "get_gallery_row",
    "get_probe",
    "ingest",
    "list_galleries",
    "known_version",
    "mapped_searcher",
    "mapped_store",
    "probe_summary",
    "publish",
    "repair",
    "set_probe",
    "space_searcher",
    "space_store",
    "stage",
    "stats",
    "verify",
    "version_record",
]
