"""Datasets inside an installed R package, read without R.

An R package keeps its data as a lazy-load database: `Rdata.rdx`, a gzipped R
serialization of an index (variable name -> offset and length), and `Rdata.rdb`, the
concatenated records, each a 4-byte big-endian length and a compressed R serialization
(zlib, or bzip2 / xz with a type byte after the length). The `rdata` library parses
and converts the serializations; this module only finds and unpacks the records.
"""

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError


def _parse(raw: bytes, where: str):
    import rdata

    try:
        with warnings.catch_warnings():  # R classes rdata has no converter for (POSIXct) stay plain numbers
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))
    except Exception as exc:  # noqa: BLE001 (a damaged record fails in many ways; the user needs the file)
        raise ColdFusionError(f"{where}: not a readable R serialization ({type(exc).__name__}: {exc})") from None


def _unpack(record: bytes, compression: int, where: str) -> bytes:
    """A record's serialization. `compression` is the index's: 1 zlib; 2 and 3 (bzip2, xz)
    put a type byte after the length, which may also say zlib ('Z') or stored ('0')."""
    if len(record) < 5:
        raise ColdFusionError(f"{where}: record of {len(record)} bytes is truncated")
    (size,) = struct.unpack(">I", record[:4])
    kind, body = (b"Z", record[4:]) if compression == 1 else (record[4:5], record[5:])
    codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if kind not in codecs:
        raise ColdFusionError(f"{where}: unknown record compression {kind!r}")
    try:
        raw = codecs[kind](body)
    except (zlib.error, OSError, ValueError, lzma.LZMAError) as exc:
        raise ColdFusionError(f"{where}: record does not decompress ({exc})") from None
    if len(raw) != size:
        raise ColdFusionError(f"{where}: record holds {len(raw)} bytes, its header says {size}")
    return raw


def read_r_dataset(data_dir: Path, name: str):
    """The dataset `name` of the lazy-load database in `data_dir` (a package's `data/`
    folder), as `rdata` converts it: a pandas DataFrame, a numpy array, a dict."""
    index_path, records = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    try:
        index = _parse(gzip.decompress(index_path.read_bytes()), str(index_path))
    except (OSError, EOFError, zlib.error) as exc:
        raise ColdFusionError(f"{index_path}: cannot be read as a gzipped R index ({exc})") from None
    variables = index.get("variables", {}) if isinstance(index, dict) else {}
    if name not in variables:
        raise ColdFusionError(f"{data_dir}: no dataset '{name}' (it has {', '.join(map(str, variables)) or 'none'})")
    offset, length = (int(v) for v in variables[name])
    compression = int(index.get("compressed", [1])[0])
    with open(records, "rb") as f:
        f.seek(offset)
        record = f.read(length)
    if len(record) != length:
        raise ColdFusionError(f"{records}: '{name}' should be {length} bytes at offset {offset}; the file is short")
    return _parse(_unpack(record, compression, f"{records} ({name})"), f"{records} ({name})")
