"""
Join the report cards of a pipeline's folders into one Markdown page: a table comparing them
(steps, tokens, time, tokens/s, MFU, losses, benchmark scores), then each folder's card.

    python report.py data/pystdlib out/quickstart out/sft out/dpo        # writes report.md here
    python report.py out/a out/b --out=out/compare.md

Each folder is a run's out_dir (with evaluate.py's reports beside the checkpoint) or a dataset's
folder. The page is rebuilt from the files each stage leaves, so it runs at any time, mid-training too.
"""

import argparse

from runlog import pipeline_page, save_atomically

parser = argparse.ArgumentParser(description="Join the report cards of several runs into one page.")
parser.add_argument("folders", nargs="+", help="run folders (out/x) and dataset folders (data/x), in pipeline order")
parser.add_argument("--out", default="report.md", help="the Markdown page to write (default: report.md)")
args = parser.parse_args()

page = pipeline_page(args.folders, args.out)
save_atomically(args.out, lambda f: f.write(page))
print(f"wrote {args.out}")
