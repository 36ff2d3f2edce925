"""
Rewards: what is right. Every response gets 0.9*accuracy + 0.1*format (the EasyR1 / NoisyRollout recipe).

accuracy: the content of the last \\boxed{} graded against the answer with mathruler's grade_answer
(string normalisation first, then sympy equivalence: fractions, LaTeX, units, degrees), plus
multiple-choice letters and yes/no. format: <think>...</think> then a non-empty \\boxed{...}.

sympy can run for hours on an answer like (99!)! (and every rank of a torchrun job then waits for that one), so
the comparison runs in a helper process (`python rewards.py`, started on first use) that gets GRADE_SECONDS per
answer: one that takes longer is graded wrong and the process is restarted.
"""
import json
import os
import queue
import re
import subprocess
import sys
import threading

from mathruler.grader import _normalize, are_equal_under_sympy, grade_answer

# The EasyR1 / NoisyRollout recipe the paper family trains with: correctness dominates, and the
# small format term keeps the <think>/\boxed layout the answer extractor relies on.
ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1

# grade_answer falls back to sympy, which can hang: cap the length (no right answer is this long), refuse python
# powers / factorials the reference does not use ("(99!)!" and "9**9**9" never return) and, when it does, the
# factorials that explode (of a number over 999, of a bracket); whatever else is slow, GRADE_SECONDS cuts off
MAX_ANSWER_CHARS = 200
GRADE_SECONDS = 5.0          # sympy's time for one comparison; a correct answer takes milliseconds

# exactly one think block at the very start; no further think tags after it
_THINK = re.compile(r"<think>((?:(?!</?think>).)*)</think>((?:(?!</?think>).)*)", re.DOTALL)
_TEXT = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", re.DOTALL)
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_BLOWUP = re.compile(r"\*\*|(?<!\\)!")  # python power, factorial (but not LaTeX's \! thin space)
_BIG_FACTORIAL = re.compile(r"(\d{4}|\))\s*!")  # 1000! and over, (...)!
_INTEGER = re.compile(r"-?\d+")


def extract_answer(response):
    """Content of the last \\boxed{...} (nested braces balanced); None if missing, unclosed or empty."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    i0, depth = start + len("\\boxed{"), 0
    for i in range(i0, len(response)):
        if response[i] == "{":
            depth += 1
        elif response[i] == "}":
            if depth == 0:
                return response[i0:i].strip() or None
            depth -= 1
    return None  # cut off mid-box (length limit): no answer


def format_ok(response):
    """True when the response is <think>...</think> followed by text holding a non-empty \\boxed{}."""
    m = _THINK.fullmatch(response.strip())
    return m is not None and extract_answer(m.group(2)) is not None


def _clean(s):
    """Strip whitespace and a \\text{} wrapper; mathruler knows ^\\circ but not the ° sign."""
    s = s.strip().replace("°", "")
    m = _TEXT.match(s)
    return m.group(1).strip() if m else s


def _letter_index(s, n_choices):
    """Index of an option letter like B, (B), B. ; None if s is not one, or out of range."""
    m = _LETTER.match(s)
    i = ord(m.group(1)) - ord("A") if m else -1
    return i if 0 <= i < n_choices else None


def _safe(given, answer):
    """Refuse inputs that can hang sympy: very long, or blow-up operators the answer does not use."""
    if len(given) > MAX_ANSWER_CHARS or _BIG_FACTORIAL.search(given):
        return False
    return not _BLOWUP.search(given) or bool(_BLOWUP.search(answer))


def is_correct(given, answer, choices=None):
    """Is the extracted answer `given` equivalent to the reference `answer`?"""
    if given is None or not _safe(given, answer):
        return False
    given, answer = _clean(given), _clean(answer)
    if answer.lower() in ("yes", "no"):  # HallusionBench-style: exact word, any case, trailing dot ok
        return given.rstrip(".").strip().lower() == answer.lower()
    givens, targets = [given], [answer]
    if choices:  # a letter on either side also stands for its option's text
        for forms in (givens, targets):
            i = _letter_index(forms[0], len(choices))
            if i is not None:
                forms.append(_clean(choices[i]))
    # Note: grade_answer copes with the dataset's spaced LaTeX ("5 \sqrt { 3 }" == "5\sqrt{3}"),
    # so no extra normalisation here. It refuses unreduced fractions ("2/4" != "\frac{1}{2}").
    return any(_grade(g, t) for g in givens for t in targets)


def equivalent(given, target):
    """grade_answer, and an integer for a reference that evaluates to it (120 for 5!): grade_answer compares an
    integer only with an integer, to refuse unsimplified answers ("2+3" for 5), which also refused this one."""
    if grade_answer(given, target):
        return True
    g, t = _normalize(given), _normalize(target)
    return bool(_INTEGER.fullmatch(g) and not _INTEGER.fullmatch(t) and are_equal_under_sympy(t, g))


_grader = None  # (process, queue of its output lines): the grading process, started on first use


def _grade(given, target):
    """equivalent(given, target) in the grading process, within GRADE_SECONDS; False when it takes longer (the
    process is killed, a new one starts at the next call) or when the process died (e.g. of an answer's memory)."""
    global _grader
    if _grader is None or _grader[0].poll() is not None:
        _grader = _start_grader()
    process, lines = _grader
    try:
        process.stdin.write(json.dumps([given, target]) + "\n")
        process.stdin.flush()
        reply = lines.get(timeout=GRADE_SECONDS)
    except (OSError, queue.Empty):
        reply = ""
    if not reply:
        process.kill()
        process.wait()
        _grader = None
        return False
    return json.loads(reply)


def _start_grader():
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def read():  # a thread, so that waiting for a reply can time out on every platform
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # the process is gone
    threading.Thread(target=read, daemon=True).start()
    try:
        ready = lines.get(timeout=120)  # importing sympy on a busy machine
    except queue.Empty:
        ready = ""
    if ready != "ready\n":
        process.kill()
        raise RuntimeError(f"the grading process ({sys.executable} {os.path.abspath(__file__)}) did not start")
    return process, lines


def score(response, answer, choices=None):
    """Reward dict for one response: overall = 0.9*accuracy + 0.1*format."""
    accuracy = float(is_correct(extract_answer(response), answer, choices))
    fmt = float(format_ok(response))
    return {"overall": ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, "accuracy": accuracy, "format": fmt}


if __name__ == "__main__":  # the grading process: one JSON [given, target] per line in, true or false out
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process, which stops cleanly
    equivalent("x + 1", "1 + x")  # sympy's first simplify imports half of it: not on an answer's time
    print("ready", flush=True)
    for request in sys.stdin:
        try:
            same = equivalent(*json.loads(request))
        except Exception:  # whatever sympy raises on a strange answer: not equivalent
            same = False
        print(json.dumps(same), flush=True)
