"""
Fetch a file by URL into a folder, once. A dropped connection resumes where it stopped (an HTTP
Range request for the rest); the file is checked against its sha256 when one is given; and it is
renamed to its real name only when whole and checked, so a reader never finds a partial or wrong
file there. prepare.py fetches corpora with it, chat.py post-training data given by URL.

    from download import download
    path, sha256 = download("https://host/data.json", "7e09a9af...", "data/downloads",
                            stage="data", local_option="--data", sha256_option="--data_sha256=")
"""

import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.parse

from optional import optional


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def progress(**kwargs):
    """A tqdm bar on a terminal; nothing when stderr is a log file or a pipe."""
    return optional("tqdm", "a progress bar").tqdm(disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def one_at_a_time(path):
    """A lock on path among the processes of this machine, so that those asking for one file at once (torchrun's)
    take turns: the first downloads it, the others then find it in place. The lock is a file in the temporary
    folder, so the data folder holds data only; where there is no fcntl (Windows), there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"download-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def download(url, expected_sha256, folder, stop=None, *, stage, local_option, sha256_option):
    """Fetch url into folder unless a matching copy is already there; return its path and sha256. The bytes
    arrive in <name>.part, which a dropped connection or a failed earlier run leaves for the next try to resume.
    stop, a threading.Event, ends a download in another thread between chunks. Errors name the caller's options:
    stage starts the line, local_option takes a local copy instead, sha256_option sets the expected checksum."""
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path) or "download")
    with one_at_a_time(path):
        if os.path.isfile(path):
            digest = file_sha256(path)
            if not expected_sha256 or digest == expected_sha256:
                print(f"using the cached download {path}")
                return path, digest
            print(f"the cached {path} does not match its sha256; downloading it again")
            os.remove(path)
        part = path + ".part"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{stage} error: cannot create {folder} ({e.strerror}); make it a folder you can write "
                             f"to, or fetch the file another way and pass {local_option}=PATH") from None
        requests = optional("requests", "a download")
        for attempt in range(3):
            have = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                headers = {"Range": f"bytes={have}-"} if have else {}
                with requests.get(url, stream=True, timeout=30, headers=headers) as r:
                    if r.status_code == 416:  # the part already holds the whole file
                        break
                    r.raise_for_status()
                    if r.status_code != 206:  # the server ignored the range: start over
                        have = 0
                    total = have + int(r.headers.get("Content-Length", 0)) or None
                    bar = progress(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path))
                    with open(part, "ab" if have else "wb") as f, bar:
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
                    raise SystemExit(f"{stage} error: could not download {url} ({type(e).__name__}: {e}); check the "
                                     f"URL and the network, or fetch the file another way and pass {local_option}=PATH"
                                     ) from None
                print(f"the connection to {url} failed ({type(e).__name__}); resuming")
            except OSError as e:  # after RequestException, which is one too: the disk, not the network
                raise SystemExit(f"{stage} error: cannot write {part} ({e.strerror}); make room, or make {folder} "
                                 "writable, and run again: the download resumes where it stopped") from None
        digest = file_sha256(part)
        if expected_sha256 and digest != expected_sha256:
            os.remove(part)
            raise SystemExit(f"{stage} error: {url} has sha256 {digest}, expected {expected_sha256}; the file changed "
                             f"upstream: check it, then pass its sha256 ({sha256_option}) or leave the check out")
        os.replace(part, path)
        return path, digest
