"""The files of a tar archive as (name, data offset, size), read from its headers.

    plain_tar_members(f)   plain ustar archives, header by header (several times tarfile's speed)
    tarfile_members(f)     any archive, by Python's tarfile

data/shard_index.py tries the first and falls back to the second on UnusualHeader.
"""

import tarfile

TAR_BLOCK = 512


class UnusualHeader(Exception):
    """A header the fast reader leaves to tarfile: pax or GNU extensions, a bad checksum."""


class ListingStopped(Exception):
    """The tar listing cannot go on; the message says where and why."""


def _octal(field):
    return int(field.split(b'\0', 1)[0].strip() or b'0', 8)


def plain_tar_members(f):
    """(name, data offset, size) of the files of a plain ustar archive (what tarfile, webdataset
    and GNU tar write for short names), read from its 512-byte headers up to the first zero
    block, about 4x faster than tarfile; raises UnusualHeader for anything else."""
    position = 0
    while True:
        f.seek(position)
        header = f.read(TAR_BLOCK)
        if not header.strip(b'\0'):
            return  # the end-of-archive blocks (or the end of the file: checked after)
        if len(header) < TAR_BLOCK:
            raise UnusualHeader
        try:
            checksum, size = _octal(header[148:156]), _octal(header[124:136])
        except ValueError:  # base-256 sizes, garbage
            raise UnusualHeader from None
        posix = header[257:263] == b'ustar\0'
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or not (
            posix or header[257:265] == b'ustar  \0'
        ):
            raise UnusualHeader
        kind, name = header[156:157], header[:100].split(b'\0', 1)[0]
        if kind not in (b'0', b'\0', b'7', b'5'):
            raise UnusualHeader  # pax headers, GNU long names, links, ...
        if posix and header[345:500].strip(b'\0'):
            name = header[345:500].split(b'\0', 1)[0] + b'/' + name
        elif not posix and header[345:500].strip(b'\0'):
            raise UnusualHeader  # old GNU fields (sparse files)
        if kind != b'5' and not name.endswith(b'/'):
            yield name.decode('utf-8', 'surrogateescape'), position + TAR_BLOCK, size
        position += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tarfile_members(f):
    """(name, data offset, size) of the files of any tar archive, read by tarfile."""
    f.seek(0)
    try:
        archive = tarfile.open(fileobj=f, mode='r:')
    except tarfile.TarError as err:
        raise ListingStopped(f'it is not a readable tar file ({err})') from None
    try:
        for member in archive:
            if member.isfile():
                yield member.name, member.offset_data, member.size
    except tarfile.TarError as err:
        raise ListingStopped(f'the listing stopped at byte {archive.offset} ({err})') from None
