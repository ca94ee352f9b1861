"""Reading shards (tar files) strictly: standard library only (the GPU machine imports this with torch alone)."""

from __future__ import annotations

import tarfile


class EndCheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly where the bytes stop at a member boundary (no end-of-archive blocks):
    a shard cut there by an interrupted copy reads as whole, its last sample without its caption and the
    rest uncounted. Every tar writer ends an archive with zero blocks, so one without them was cut: with
    `tarfile.open(..., tarinfo=EndCheckedTarInfo)` that is a ReadError saying so."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as exc:
            if tarfile_.offset == 0:
                raise
            raise tarfile.ReadError(
                f"cut short at byte {tarfile_.offset}: the tar ends without its end-of-archive blocks"
            ) from exc
