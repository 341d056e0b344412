"""Zip archive members read in place: where a member's bytes start in the archive, and a
member as a seekable file without inflating it twice.

zipfile's own member files seek backwards by reading again from the member's start (in
Python 3.11), which makes the scattered reads of HDF5 or a memory map of an array in the
member quadratic or impossible; a stored member is read from the archive file directly.

Example:
    >>> with zipfile.ZipFile(path) as archive:
    ...     info = archive.getinfo("model.weights.h5")
    ...     with open_member(path, archive, info) as member:
    ...         h5py.File(member, "r")
"""

import io
import struct
import zipfile

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes, then the name and extra field lengths


def member_start(path, info):
    """The offset in the archive file `path` where the bytes of member `info` begin."""
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(stream.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of member '{info.filename}'")
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a file, as a read-only seekable file."""

    def __init__(self, path, start, size):
        super().__init__()
        self._file, self._start, self._size, self._position = open(path, "rb"), start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        self._position = max(0, offset + (0, self._position, self._size)[whence])
        return self._position

    def readinto(self, buffer):
        self._file.seek(self._start + self._position)
        count = self._file.readinto(memoryview(buffer)[:max(0, self._size - self._position)])
        self._position += count
        return count

    def close(self):
        self._file.close()
        super().close()


def open_member(path, archive, info):
    """Member `info` of the open `archive` (the file `path`) as a seekable read-only file:
    read in place when stored, else inflated into memory (check its size first)."""
    if info.compress_type == zipfile.ZIP_STORED:
        return io.BufferedReader(_Window(path, member_start(path, info), min(info.file_size, info.compress_size)))
    return io.BytesIO(archive.read(info))
