"""VTK ImageData (.vti) export of a cell, for ParaView.

The phases become cell data "phase" (one value per voxel) and "E" (the voxel's Young's
modulus, float32); the image spacing is size / n and the origin 0. VTK orders cells with
x fastest, so the [x, y, z] C-order array is written in Fortran order. Binary output is
inline base64 of (UInt64 byte count, raw little-endian data), as VTK XML expects.
"""
from __future__ import annotations

import base64
import os

import numpy as np

from .atomic import atomic_output
from .cell import Cell

_VTK_TYPES = {np.dtype("uint8"): "UInt8", np.dtype("uint16"): "UInt16", np.dtype("float32"): "Float32"}


def _data_array(name: str, values: np.ndarray, binary: bool) -> str:
    data = np.ascontiguousarray(values.ravel(order="F")).astype(values.dtype.newbyteorder("<"), copy=False)
    vtk_type = _VTK_TYPES[np.dtype(values.dtype).newbyteorder("=")]
    if binary:
        raw = np.array([data.nbytes], dtype="<u8").tobytes() + data.tobytes()
        text = base64.b64encode(raw).decode("ascii")
        fmt = "binary"
    else:
        text = " ".join(map(str, data.tolist()))
        fmt = "ascii"
    return (f'        <DataArray type="{vtk_type}" Name="{name}" format="{fmt}">\n'
            f"          {text}\n        </DataArray>\n")


def write_vti(cell: Cell, path, binary: bool = True) -> None:
    """Write ``cell`` as VTK XML ImageData to ``path`` (atomically: temp file, then rename)."""
    path = os.fspath(path)
    nx, ny, nz = cell.shape
    spacing = [s / n for s, n in zip(cell.size, cell.shape)]
    phases = cell.phases if cell.phases.dtype in (np.uint8, np.uint16) else cell.phases.astype(np.uint16)
    E = cell.E.astype(np.float32)[cell.phases]
    extent = f"0 {nx} 0 {ny} 0 {nz}"
    xml = ('<?xml version="1.0"?>\n'
           '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
           f'  <ImageData WholeExtent="{extent}" Origin="0 0 0" Spacing="{" ".join(repr(s) for s in spacing)}">\n'
           f'    <Piece Extent="{extent}">\n'
           '      <CellData Scalars="phase">\n'
           + _data_array("phase", phases, binary) + _data_array("E", E, binary) +
           '      </CellData>\n    </Piece>\n  </ImageData>\n</VTKFile>\n')
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(xml)
