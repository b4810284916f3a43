"""Object-storage-neutral file access: every path is an fsspec URL.

``s3://bucket/key``, ``file:///abs/path`` and plain local paths behave the same. S3 endpoint
and credentials come from the environment the way boto does it (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, instance roles) or from fsspec's
own configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec``); nothing is hard-coded.

Object-store calls have bounded waits (:data:`S3_TIMEOUTS`): an endpoint that refuses or never
answers ends the command with an error instead of hanging it.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Iterable

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "filesystem",
    "S3_TIMEOUTS",
    "ObjectStoreUnreachable",
    "unreachable",
    "join",
    "check_key",
    "list_images",
    "list_image_sizes",
    "outside_prefix",
    "DEFAULT_MAX_PIXELS",
    "read_bytes",
    "write_bytes",
    "exists",
    "check_writable_parent",
    "decode_image",
    "image_size",
    "encode_png",
    "to_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

#: Images declaring more pixels than this are refused before decoding (decompression bombs):
#: 64 Mpx is 40x a Severstal image and ~64 MB as grey uint8, ~192 MB as RGB.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


#: Connect and read timeouts in seconds for S3, overridable by ``CAM2SEG_S3_CONNECT_TIMEOUT`` /
#: ``CAM2SEG_S3_READ_TIMEOUT``. s3fs's own defaults (5 s / 15 s, 5 botocore attempts, 5 s3fs
#: retries around those) let a silent endpoint hold a command for over six minutes with no
#: output. Here a call makes at most ``AWS_MAX_ATTEMPTS`` (default 2, botocore's standard retry
#: mode) attempts, inside :data:`S3FS_RETRIES` s3fs retries: a silent endpoint fails in about
#: 2 x 2 x 20 s plus backoff.
S3_TIMEOUTS = {"connect_timeout": 5.0, "read_timeout": 20.0}
S3_ATTEMPTS = 2
#: s3fs's retry loop also covers failures botocore does not retry (a body cut off mid-read).
S3FS_RETRIES = 2


class ObjectStoreUnreachable(OSError):
    """An object store that refused, timed out or dropped the connection; the message names it."""


class ImageDecodeError(ValueError):
    """An image file that cannot become a uint8 array; the message is the reason."""


def filesystem(url: str, fresh: bool = False, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for any fsspec URL or local path.

    ``fresh``: forget cached listings of the path first. fsspec keeps one filesystem per process
    and s3fs caches directory listings in it, so a long-lived process would not see images or
    commits other processes wrote since its last listing (and could take committed parts for
    leftovers). Every listing that decides what to do asks for a fresh one.
    """
    protocol = fsspec.core.split_protocol(str(url))[0]
    if protocol in ("s3", "s3a"):
        storage_options = _s3_options(storage_options)
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options)
    if protocol in ("s3", "s3a"):
        # A class attribute in s3fs, not an __init__ argument; the instance is cached per process.
        fs.retries = min(fs.retries, S3FS_RETRIES)
    if fresh:
        fs.invalidate_cache(path)
    return fs, path


def _s3_options(storage_options: dict) -> dict:
    """``storage_options`` with cam2seg's timeouts added where neither the caller nor fsspec's
    configuration (``FSSPEC_S3`` or ``~/.config/fsspec``) set them."""
    configured = dict(fsspec.config.conf.get("s3", {}))
    config_kwargs = {**configured.get("config_kwargs", {}), **storage_options.get("config_kwargs", {})}
    for key, default in S3_TIMEOUTS.items():
        env = os.environ.get("CAM2SEG_S3_" + key.upper())
        if key not in config_kwargs:
            config_kwargs[key] = _seconds("CAM2SEG_S3_" + key.upper(), env) if env else default
    if "retries" not in config_kwargs and "AWS_MAX_ATTEMPTS" not in os.environ:
        config_kwargs["retries"] = {"max_attempts": S3_ATTEMPTS, "mode": "standard"}
    return {**storage_options, "config_kwargs": config_kwargs}


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ValueError(f"{name}={value!r}: expected seconds, a number in (0, 3600]")
    return seconds


def unreachable(error: BaseException) -> ObjectStoreUnreachable | None:
    """The error as an :class:`ObjectStoreUnreachable` if it is a connection failure or timeout
    from botocore, else None (so callers can turn network faults into one clear line)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:
        return None
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return ObjectStoreUnreachable(f"object store unreachable: {error} (timeouts: CAM2SEG_S3_CONNECT_TIMEOUT, "
                                      "CAM2SEG_S3_READ_TIMEOUT, AWS_MAX_ATTEMPTS)")
    return None


def absolute(url: str) -> str:
    """A plain local path made absolute (Ray workers run in other directories); URLs unchanged."""
    url = str(url)
    return url if "://" in url else os.path.abspath(url)


def join(url: str, *keys: str) -> str:
    """Join checked relative keys onto a URL with '/' (keys must pass :func:`check_key`)."""
    url = str(url).rstrip("/")
    for key in keys:
        url = url + "/" + check_key(key)
    return url


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key ('a/b.jpg'), else raise ValueError.

    Image ids come from CSV files and listings that other people wrote; they are joined onto
    archive roots, so anything that could escape the root or alias another key is refused.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"empty or non-string key: {key!r}")
    if "\\" in key or "\x00" in key or key.startswith("/") or "://" in key:
        raise ValueError(f"unsafe key {key!r}: must be a relative path with '/' separators")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe key {key!r}: empty, '.' or '..' path segment")
    return key


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def list_images(prefix: str, extensions: Iterable[str] = IMAGE_EXTENSIONS, **storage_options) -> list[str]:
    """Keys of image files under ``prefix`` (recursive), relative to it, sorted.

    One recursive listing call (a paginated ListObjectsV2 on S3, a directory walk locally),
    filtered by extension case-insensitively. Raises FileNotFoundError for a missing prefix.
    Local symlinks are listed like files (wherever they point), so that readers can refuse
    the ones that resolve outside the prefix with a reason (:func:`outside_prefix`).
    """
    return sorted(list_image_sizes(prefix, extensions, **storage_options))


def list_image_sizes(prefix: str, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                     **storage_options) -> dict[str, int | None]:
    """``{key: size in bytes}`` of the image files under ``prefix``; same listing and keys as
    :func:`list_images` (sizes come with the listing: no extra request per file). The size is
    None where the listing has none (a dangling local symlink)."""
    fs, root = filesystem(prefix, fresh=True, **storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"image prefix not found: {prefix}")
    if fs.isfile(root):
        raise NotADirectoryError(f"image prefix is a file, not a folder: {prefix}")
    exts = tuple(e.lower() for e in extensions)
    local = isinstance(fs, LocalFileSystem)
    out: dict[str, int | None] = {}
    for path, info in fs.find(root, withdirs=False, detail=True).items():
        rel = posixpath.relpath(path, root) if local else path[len(root) + 1 :]
        rel = rel.replace(os.sep, "/")
        if rel.lower().endswith(exts) and not any(p.startswith(".") for p in rel.split("/")):
            size = info.get("size")
            if local and info.get("islink") and not os.path.exists(path):
                size = None  # dangling link: the listing's size is the link's own
            out[rel] = None if size is None else int(size)
    return dict(sorted(out.items()))


def outside_prefix(url: str, prefix: str) -> bool:
    """Whether a local ``url`` resolves (symlinks followed) outside the local folder ``prefix``.

    Object-store keys cannot point elsewhere, so URLs with a non-local protocol are never
    outside. Used to refuse symlinks such as ``img.jpg -> /etc/...`` in an image folder.
    """
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        return False
    _, root = filesystem(prefix)
    root = os.path.realpath(root)
    real = os.path.realpath(path)
    return not (real == root or real.startswith(root.rstrip(os.sep) + os.sep))


def arrow_filesystem(url: str, **storage_options):
    """``(path, pyarrow filesystem or None)`` for libraries that take pyarrow filesystems (Ray
    Train's storage, Ray Data's readers): None and an absolute path locally, else the fsspec
    filesystem wrapped for pyarrow and the path inside it."""
    fs, path = filesystem(url, **storage_options)
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def read_bytes(url: str, **storage_options) -> bytes:
    fs, path = filesystem(url, **storage_options)
    return fs.cat_file(path)


def exists(url: str, **storage_options) -> bool:
    fs, path = filesystem(url, fresh=True, **storage_options)
    return fs.exists(path)


def list_names(url: str, **storage_options) -> list[str]:
    """The names of the files and folders directly inside the folder ``url``, sorted; [] when
    there is no such folder. Listed afresh (an S3 listing cached earlier would miss new keys)."""
    fs, path = filesystem(url, fresh=True, **storage_options)
    path = path.rstrip("/")
    if not fs.isdir(path):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(path, detail=False))


def write_bytes(url: str, data: bytes, **storage_options) -> None:
    """Write a whole file so that readers see either the old content or the new, never a part.

    Locally: a temporary file beside the target, then an atomic rename. On object stores a
    single PUT is already atomic. Parent folders are created where the backend has them.
    """
    fs, path = filesystem(url, **storage_options)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"cannot write {url}: {_file_ancestor(parent) or parent} is a file, "
                                     "not a folder") from None
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot write {url}: it is a folder")
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def _file_ancestor(path: str) -> str | None:
    """The nearest existing ancestor of a local ``path`` (itself included) that is not a folder."""
    p = os.path.abspath(path)
    while True:
        if os.path.lexists(p):
            return None if os.path.isdir(p) else p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def check_writable_parent(url: str, **storage_options) -> None:
    """Raise NotADirectoryError when a local ``url`` cannot be created because one of its
    parents is a file (``somefile.txt/out.json``); checked before work that would be lost."""
    fs, path = filesystem(url, **storage_options)
    if isinstance(fs, LocalFileSystem):
        blocker = _file_ancestor(os.path.dirname(path))
        if blocker is not None:
            raise NotADirectoryError(f"cannot write {url}: {blocker} is a file, not a folder")
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot write {url}: it is a folder")


def _check_pixels(w: int, h: int, max_pixels: int | None) -> None:
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image declares an empty size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(f"image declares {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                               "(label.max_pixels); not decoded")


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG bytes to ``uint8[H, W]`` (grayscale) or ``uint8[H, W, 3]`` (colour).

    Palette and bilevel images are expanded; RGBA/LA with a fully opaque alpha lose the alpha.
    Refused with ImageDecodeError (the message is the reason): empty or truncated files,
    non-images, 16-bit or float images (no safe 8-bit scaling is implied), images with
    real transparency, and images whose header declares more than ``max_pixels`` pixels
    (checked before any pixel is decoded; None: no limit of cam2seg's own, Pillow's still
    applies). Any other exception Pillow raises while decoding becomes ImageDecodeError too.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty file")
    try:
        return _decode(data, max_pixels)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image file") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image declares more pixels than the decompression-bomb limit; not decoded "
                               f"(Pillow: {e})") from None
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a property of the file, never of the job
        raise ImageDecodeError(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def _decode(data: bytes, max_pixels: int | None) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    _check_pixels(*img.size, max_pixels)
    img.load()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        raise ImageDecodeError(f"16/32-bit image (mode {mode}); convert the archive to 8-bit")
    if mode == "F":
        raise ImageDecodeError("floating-point image (mode F); convert the archive to 8-bit")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] != 255).any():
            raise ImageDecodeError(f"image has transparent pixels (mode {mode}); flatten it first")
        img = img.convert("L" if mode == "LA" else "RGB")
    elif mode in ("1", "L"):
        img = img.convert("L")
    elif mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from an image's header, without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise ImageDecodeError(f"cannot read image header: {e}") from None
    except Exception as e:  # noqa: BLE001 -- e.g. Pillow's DecompressionBombError, SyntaxError
        raise ImageDecodeError(f"cannot read image header: {type(e).__name__}: {e}") from None
    return h, w


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``uint8[H, W]`` or ``uint8[H, W, 3]`` -> ``uint8[H, W, 3]`` (grey replicated)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected [H, W] or [H, W, 3], got {image.shape}")


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
