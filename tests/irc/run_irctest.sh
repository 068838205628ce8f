#!/bin/sh
# Run irctest (the IRC servers' interoperability suite) against selchat's IRC door.
#
#   tests/irc/run_irctest.sh [core|all] [extra pytest args...]
#
# core: the core-gateway selection of IRC_TESTING.md (85 tests); all: the whole recommended
# selection (every server test but services-based ones).
#
# Environment:
#   IRCTEST_DIR         irctest checkout (default: ../shared/irctest relative to the repo);
#                       it may be read-only: pytest's cache is off and temp files go to $TMPDIR.
#   IRCTEST_CONTROLLER  controller module (default: selchat_controller, from this folder);
#                       e.g. irctest.controllers.ngircd to check the harness itself.
#   IRCTEST_VENV        virtualenv to create/use (default: .irctest-venv at the repo root).
#   IRCTEST_JOBS        pytest-xdist workers (default: 2).
#   SELCHAT_PYTHON      interpreter for the server (default: python3 on PATH, not the venv's).
#   IRCTEST_LOG         copy the full pytest output there.
#
# Why a virtualenv: irctest pins its own pytest; the project's test tools stay untouched.
# Why loopback only: irctest binds ("", 0) to pick ports; our controller always listens on
# 127.0.0.1, and irctest's clients connect to the hostname it chose (localhost-resolvable).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
IRCTEST_DIR=${IRCTEST_DIR:-"$ROOT/../shared/irctest"}
IRCTEST_DIR=$(cd "$IRCTEST_DIR" && pwd)
VENV=${IRCTEST_VENV:-"$ROOT/.irctest-venv"}
CONTROLLER=${IRCTEST_CONTROLLER:-selchat_controller}
JOBS=${IRCTEST_JOBS:-2}
SELECTION=${1:-core}
[ $# -gt 0 ] && shift

case "$SELECTION" in
    core|all) ;;
    *) echo "usage: $0 [core|all] [pytest args...]" >&2; exit 2 ;;
esac

# The server runs on the project's interpreter (its dependencies), irctest on the venv's.
SELCHAT_PYTHON=${SELCHAT_PYTHON:-$(command -v python3)}
export SELCHAT_PYTHON

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV (irctest requirements)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$IRCTEST_DIR/requirements.txt" pytest-timeout pytest-xdist
fi

# Writable scratch: irctest keeps its port registry in the temp dir; nothing goes in IRCTEST_DIR.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/irctest.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT INT TERM
export TMPDIR="$SCRATCH"
export PYTHONDONTWRITEBYTECODE=1
# The controller folder first, then the project (so the controller can find the checkout).
export PYTHONPATH="$HERE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SELCHAT_ROOT="$ROOT"

D=irctest/server_tests
M='not services and not implementation-specific and not deprecated and not strict'
cd "$IRCTEST_DIR"
OUT="$SCRATCH/pytest.out"
set +e
if [ "$SELECTION" = core ]; then
    FILES="$D/connection_registration.py $D/pingpong.py $D/join.py $D/part.py $D/messages.py $D/names.py \
           $D/quit.py $D/buffering.py $D/regressions.py $D/isupport.py $D/cap.py $D/list.py $D/who.py \
           $D/echo_message.py $D/message_tags.py"
    K='not Passworded and not JoinKey and not JoinManySingleKey and not LabeledResponse and not LabeledNick and not Secret and not ELIST and not Whox and not WhoInvisible and not Away and not Oper'
    # shellcheck disable=SC2086  # FILES is a word list on purpose
    "$VENV/bin/python" -m pytest -p no:cacheprovider --timeout 60 -q -rfE -n "$JOBS" \
        --controller "$CONTROLLER" -m "$M" -k "$K" $FILES "$@" >"$OUT" 2>&1
else
    "$VENV/bin/python" -m pytest -p no:cacheprovider --timeout 60 -q -rfE -n "$JOBS" \
        --controller "$CONTROLLER" -m "$M" "$D" "$@" >"$OUT" 2>&1
fi
RC=$?
set -e
# Full output for whoever wants it, then the summary line on its own.
if [ -n "${IRCTEST_LOG:-}" ]; then
    cp "$OUT" "$IRCTEST_LOG"
fi
grep -E '^(FAILED|ERROR) ' "$OUT" || true
tail -n 1 "$OUT"
exit $RC
