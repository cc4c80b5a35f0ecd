"""
Downloading a file once, checked against its sha256: prepare.py's URLs and the data that
translate.py reads from the public copies of Multi30K.

    path, digest = download("https://example.org/corpus.txt.gz", "<sha256 or ''>", "data/download")

A file already in the folder with the expected sha256 is not fetched again. The bytes arrive in
<name>.part and the file takes its name only once complete and checked, so an interrupted or
corrupted download is never read as the file.
"""

import hashlib
import os
import sys
import urllib.parse

import requests
from tqdm import tqdm


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def progress(**kwargs):
    """A tqdm bar on a terminal; nothing when stderr is a log file or a pipe."""
    return tqdm(disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def download(url, expected_sha256, folder, stop=None, error="prepare error",
             offline="fetch the file another way and pass --input=PATH",
             other_sha256="pass its sha256 (--url_sha256= for a config's url, --input_sha256= for --input, or after "
                          "the URL in a URL list) or leave the check out"):
    """Fetch url into folder unless a matching copy is already there; return its path and sha256.

    The bytes arrive in <name>.part, which a dropped connection or an earlier run's failure leaves
    behind: the next try asks the server for the rest only (an HTTP Range request). stop, a
    threading.Event, ends a download in another thread between chunks. A failure stops with one line
    that starts with `error` and ends with what to do: `offline`, without the network; `other_sha256`,
    if the file changed upstream."""
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path) or "download")
    if os.path.isfile(path):
        digest = file_sha256(path)
        if not expected_sha256 or digest == expected_sha256:
            print(f"using the cached download {path}")
            return path, digest
        print(f"the cached {path} does not match its sha256; downloading it again")
        os.remove(path)
    os.makedirs(folder, exist_ok=True)
    part = path + ".part"
    for attempt in range(3):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with requests.get(url, stream=True, timeout=30, headers={"Range": f"bytes={have}-"} if have else {}) as r:
                if r.status_code == 416:  # the part already holds the whole file
                    break
                r.raise_for_status()
                if r.status_code != 206:  # the server ignored the range: start over
                    have = 0
                total = have + int(r.headers.get("Content-Length", 0)) or None
                with open(part, "ab" if have else "wb") as f, \
                        progress(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                    for chunk in r.iter_content(1 << 16):
                        if stop is not None and stop.is_set():
                            return None, None
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is None or os.path.getsize(part) >= total:
                break
            print(f"the connection to {url} dropped at {os.path.getsize(part):,} bytes; resuming")
        except requests.RequestException as e:
            if attempt == 2 or isinstance(e, requests.HTTPError):
                raise SystemExit(f"{error}: could not download {url} ({type(e).__name__}: {e}); "
                                 f"check the URL and the network, or {offline}") from None
            print(f"the connection to {url} failed ({type(e).__name__}); resuming")
    digest = file_sha256(part)
    if expected_sha256 and digest != expected_sha256:
        os.remove(part)
        raise SystemExit(f"{error}: {url} has sha256 {digest}, expected {expected_sha256}; the file changed "
                         f"upstream: check it, then {other_sha256}")
    os.replace(part, path)
    return path, digest
