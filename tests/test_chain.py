"""run.sh, the main command, at toy size (TINY=1): every stage runs in order, from raw text to a chat
answer, with the network shut off, and one page holds every stage's card."""

import os
import re
import subprocess

from conftest import REPO


def test_the_chain_goes_from_raw_text_to_a_report_and_a_chat_answer_without_a_network(tmp_path):
    unreachable = "http://127.0.0.1:9"  # any download would fail here
    env = dict(os.environ, TINY="1", DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"), PYTHONUNBUFFERED="1",
               HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable, NO_PROXY="", HF_HUB_OFFLINE="1")
    run = subprocess.run(["bash", os.path.join(REPO, "run.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = re.findall(r"^=== python (\S+)", run.stdout, flags=re.M)
    assert stages == ["prepare.py", "train.py", "prepare_chat.py", "sft.py", "dpo.py", "evaluate.py", "evaluate.py",
                      "report.py", "sample.py"]
    page = (tmp_path / "out" / "report.md").read_text()
    for folder, stage in (("data/pystdlib_bpe", "prepare"), ("data/pystdlib_bpe_chat", "chat data"),
                          ("out/pretrain", "pretrain"), ("out/sft", "sft"), ("out/dpo", "dpo")):
        assert f"## {stage}: {tmp_path / folder}" in page
    assert page.count("| heldout_def_lines |") == 2  # the held-out score, in the SFT and the DPO card
    request = (tmp_path / "data" / "pystdlib_bpe_chat" / "example_request.txt").read_text().strip()
    assert f"--prompt={request}" in run.stdout and run.stdout.rstrip().endswith(f"{tmp_path / 'out' / 'report.md'}")
