"""`python -m appleslm_tui [MODEL]`: the chat app without the `appleslm` CLI (development, tmux check)."""

import argparse

from appleslm_tui.app import run_chat

parser = argparse.ArgumentParser(prog="python -m appleslm_tui", description=run_chat.__doc__)
parser.add_argument("model", nargs="?", help="a model directory or a Hub repo id")
parser.add_argument("--system-prompt", default="")
parser.add_argument("--temp", type=float, default=None)
parser.add_argument("--max-tokens", type=int, default=None)
parser.add_argument("--trust-remote-code", action="store_true")
args = parser.parse_args()
run_chat(
    args.model,
    system_prompt=args.system_prompt,
    temperature=args.temp,
    max_tokens=args.max_tokens,
    trust_remote_code=args.trust_remote_code,
)
