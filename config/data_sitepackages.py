# Every .py file of this Python's installed packages (site-packages), GPT-2 tokenized:
# a bigger code corpus than the standard library, for GPU runs. Its size depends on
# what is installed (with torch, around 180 MB and 14,000 files). Needs no network.
# Builds data/sitepackages/:
#   python prepare.py config/data_sitepackages.py

import sysconfig

dataset = "sitepackages"
input = sysconfig.get_paths()["purelib"]
glob = "**/*.py"
tokenizer = "gpt2"
