"""Images, patch windows, sampling masks, label and uncertainty stores, read straight from (OME-)Zarr."""

from bioadapt.data.image import Image, Level, open_image
from bioadapt.data.labels import LabelStore
from bioadapt.data.masks import SamplingMask
from bioadapt.data.refs import ImageRef, LabelledRegion
from bioadapt.data.regions import Region
from bioadapt.data.sampling import PatchWindow, sample_patches
from bioadapt.data.uncertainty import UncertaintyStore
from bioadapt.data.writer import write_ome_zarr

__all__ = ["Image", "ImageRef", "LabelStore", "LabelledRegion", "Level", "PatchWindow", "Region", "SamplingMask",
           "UncertaintyStore", "open_image", "sample_patches", "write_ome_zarr"]
