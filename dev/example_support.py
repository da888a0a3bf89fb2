"""Write the "your own model" walkthrough's example data: a small support assistant, Kiku of Acme Cloud.

Outputs (deterministic; committed under examples/):
  support.jsonl           200 OpenAI-chat conversations with a system prompt, for `sft --mix file:...`
  support-heldout.jsonl   verifiable rows {"system", "prompt", "answer", "match": "regex"} whose questions are
                          worded differently from every training question, for `eval chat --tasks file:...`

Each topic has one canonical answer carrying a fact a regex can find (a menu path, an address, a number of
days), several training phrasings and two held-out phrasings. Training rows combine a phrasing with an
opening ("Hi,", "Hello Kiku,", ...), so the model sees the same question in many shapes; the held-out
questions share no phrasing with them (checked below), which makes the held-out score a measure of what
the model learned rather than what it memorised.

Run: python dev/example_support.py [--out examples]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SYSTEM = "You are Kiku, the support assistant of Acme Cloud. Answer in one or two short sentences."

# topic: (answer, regex for the held-out check, training phrasings, held-out phrasings)
TOPICS = {
    "password": (
        "Open Settings > Security and choose Reset password; we email you a link that works for 1 hour.",
        r"Settings > Security",
        ["How do I reset my password?", "I forgot my password.", "How can I change my password?",
         "My password does not work any more, what do I do?", "Where do I reset the password?"],
        ["I can't remember the password for my account, help?", "What are the steps to get a new password?"],
    ),
    "email": (
        "Go to Settings > Profile and edit the email field; we send a confirmation to the new address.",
        r"Settings > Profile",
        ["How do I change my email address?", "Can I use a different email?", "I want to update my email.",
         "Where do I edit my email address?", "How can I switch the email on my account?"],
        ["My address changed, how do I put the new one on the account?", "Is there a way to replace the email I signed up with?"],
    ),
    "hours": (
        "Our human support team answers from 9:00 to 18:00 JST, Monday to Friday.",
        r"9:00 to 18:00",
        ["When is support open?", "What are your support hours?", "Can I talk to a person today?",
         "At what time can I reach your team?", "Are you open on weekends?"],
        ["Which hours is a human available to help?", "Until what time does your staff reply?"],
    ),
    "contact": (
        "Write to support@acme.example and we reply within one business day.",
        r"support@acme\.example",
        ["How do I contact support?", "What is your support email?", "How can I reach you?",
         "Who do I write to about a problem?", "Is there an address for help?"],
        ["Where should I send a message when something breaks?", "Give me the mail address of your helpdesk."],
    ),
    "refund": (
        "You can get a full refund within 30 days of payment from Billing > Refunds.",
        r"30 days",
        ["Can I get a refund?", "How do refunds work?", "I want my money back.",
         "Is there a refund policy?", "How long do I have to ask for a refund?"],
        ["I paid by mistake, can I have it returned?", "What is the deadline to be reimbursed?"],
    ),
    "cancel": (
        "Open Billing > Plan and press Cancel plan; you keep access until the end of the paid month.",
        r"Billing > Plan",
        ["How do I cancel my subscription?", "I want to stop paying.", "Where do I cancel my plan?",
         "How can I end my subscription?", "Can I unsubscribe from the paid plan?"],
        ["I no longer need the service, how do I stop it?", "What should I click to quit my plan?"],
    ),
    "export": (
        "Use Settings > Data > Export; you get a ZIP of all your files by email within 24 hours.",
        r"Export",
        ["How do I export my data?", "Can I download all my files?", "How do I get a copy of my data?",
         "Is there a backup download?", "Where is the data export?"],
        ["I want to save everything I stored with you on my laptop.", "How do I take all my files out of Acme Cloud?"],
    ),
    "twofactor": (
        "Turn on two-factor login in Settings > Security > Two-factor and scan the QR code with your app.",
        r"Two-factor",
        ["How do I turn on two-factor authentication?", "Can I enable 2FA?", "How do I make my login safer?",
         "Where is the two-factor setting?", "Do you support authenticator apps?"],
        ["I want a code from my phone when I sign in, how?", "How can I add a second step to logging in?"],
    ),
    "pricing": (
        "The Basic plan is 5 dollars a month for 100 GB, and the Pro plan is 12 dollars a month for 1 TB.",
        r"5 dollars",
        ["How much does it cost?", "What are your prices?", "What plans do you have?",
         "How expensive is Acme Cloud?", "What does the Pro plan cost?"],
        ["Tell me the monthly fee.", "What would I pay for storage with you?"],
    ),
    "delete": (
        "Go to Settings > Account > Delete account; everything is erased after 7 days.",
        r"7 days",
        ["How do I delete my account?", "I want to remove my account.", "Can you erase my account?",
         "How do I close my account for good?", "Where do I delete everything?"],
        ["Please get rid of my profile and data.", "How can I make the account disappear permanently?"],
    ),
}

OPENINGS = ["", "Hi, ", "Hello Kiku, ", "Hello, ", "Quick question: ", "Good morning. ", "Hey, ", "Sorry to bother you, "]


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s[:1].isupper() and not s.startswith("I ") and not s.startswith("I'") else s


def training_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct single-turn conversations (and a few two-turn ones: a thank-you follow-up)."""
    combos = [(t, p, o) for t, (_, _, phr, _) in TOPICS.items() for p, o in itertools.product(phr, OPENINGS)]
    rng = random.Random(seed)
    rng.shuffle(combos)
    if n > len(combos):
        raise SystemExit(f"only {len(combos)} distinct conversations can be made; asked for {n}")
    rows = []
    for i, (topic, phrasing, opening) in enumerate(combos[:n]):
        answer = TOPICS[topic][0]
        question = opening + (_lower_first(phrasing) if opening else phrasing)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
        if i % 10 == 0:  # some conversations go on: the model learns to close politely too
            msgs += [{"role": "user", "content": "Thanks!"},
                     {"role": "assistant", "content": "You're welcome. Anything else I can help with?"}]
        rows.append({"messages": msgs})
    return rows


def heldout_rows() -> list[dict]:
    # "regex" matches the whole reply: the fact may stand anywhere in it
    return [{"system": SYSTEM, "prompt": q, "answer": f".*{regex}.*", "match": "regex"}
            for _, (_, regex, _, held) in TOPICS.items() for q in held]


def check_disjoint(train: list[dict], held: list[dict]) -> None:
    seen = {m["content"].lower() for r in train for m in r["messages"] if m["role"] == "user"}
    phrasings = {p.lower() for _, (_, _, phr, _) in TOPICS.items() for p in phr}
    for r in held:
        q = r["prompt"].lower()
        if q in seen or any(p in q for p in phrasings):
            raise SystemExit(f"held-out question {r['prompt']!r} repeats a training phrasing")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples", help="output folder (default: examples)")
    ap.add_argument("--rows", type=int, default=200, help="training conversations (default: 200)")
    args = ap.parse_args(argv)
    train, held = training_rows(args.rows), heldout_rows()
    check_disjoint(train, held)
    out = Path(args.out)
    write_jsonl(out / "support.jsonl", train)
    write_jsonl(out / "support-heldout.jsonl", held)
    print(f"wrote {len(train)} conversations to {out / 'support.jsonl'} and {len(held)} held-out "
          f"questions to {out / 'support-heldout.jsonl'}")


if __name__ == "__main__":
    main()
