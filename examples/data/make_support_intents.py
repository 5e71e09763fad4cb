"""Generates support-intents.jsonl, the small intent-classification dataset kubetune ships.

Why generated: the demo and the end-to-end tests need a real (if small) text-classification task
whose licence is ours, and a script makes every row reproducible and reviewable. Each intent has
many hand-written templates; slots (products, amounts, dates...), greetings, sign-offs, casing and
the odd typo make the phrasing vary so that a model has to learn the intent, not memorise strings.

Run: python examples/data/make_support_intents.py   (rewrites the .jsonl next to this file)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
PER_INTENT = 90

SLOTS: dict[str, list[str]] = {
    "product": [
        "headphones",
        "laptop stand",
        "coffee grinder",
        "running shoes",
        "desk lamp",
        "phone case",
        "backpack",
        "water bottle",
        "keyboard",
        "monitor",
        "blender",
        "jacket",
    ],
    "amount": ["$12.99", "$45", "$120", "19 euros", "$7.50", "$300", "£60", "$89.99"],
    "date": [
        "yesterday",
        "last week",
        "on Monday",
        "two days ago",
        "this morning",
        "on the 3rd",
        "last month",
        "over the weekend",
    ],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "the courier", "Royal Mail"],
    "device": ["iPhone", "Android phone", "Windows laptop", "Mac", "tablet", "Chromebook"],
    "plan": [
        "premium plan",
        "monthly subscription",
        "family plan",
        "pro membership",
        "annual plan",
    ],
    "order": ["#48213", "#10937", "#77120", "#55002", "#31415", "#90210"],
    "app_thing": ["the app", "the website", "checkout", "the login page", "the mobile app"],
}

TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {product}",
        "why is there a charge of {amount} on my card",
        "my invoice shows {amount} but I expected less",
        "can you explain the extra fee on my bill",
        "I see a double charge from {date}",
        "the price I paid for the {plan} is wrong",
        "my credit card was billed {amount} without my permission",
        "how do I update my payment method",
        "I need a copy of my invoice for order {order}",
        "you charged me tax twice on my last bill",
        "the amount on my statement doesn't match my order",
        "why did my {plan} cost go up",
        "can I change the card you bill every month",
        "there is an unknown charge of {amount}",
        "my payment failed but money left my account",
        "I want a receipt for the {amount} I paid {date}",
        "was I billed for the {plan} already",
        "please fix the overcharge on my account",
    ],
    "refund": [
        "I want my money back for the {product}",
        "how do I get a refund for order {order}",
        "the {product} arrived broken, please refund me",
        "when will I receive my refund of {amount}",
        "I returned the {product} {date}, where is my refund",
        "can I get reimbursed for the damaged {product}",
        "please refund the {amount} you took",
        "refund status for order {order}?",
        "I'd like to return the {product} for a full refund",
        "still waiting on the refund you promised {date}",
        "the {product} is not what I ordered, I want a refund",
        "how long do refunds take to show on my card",
        "can you send the refund to a different card",
        "I sent the {product} back and haven't been credited",
        "is it possible to get a partial refund of {amount}",
        "my refund was approved but I never got the money",
        "return and refund the {product} please",
    ],
    "shipping": [
        "where is my {product}",
        "my order {order} hasn't arrived yet",
        "the tracking for {carrier} hasn't updated since {date}",
        "when will my package be delivered",
        "can I change the delivery address for order {order}",
        "{carrier} says delivered but I have nothing",
        "do you ship to Canada",
        "how much is express shipping",
        "my parcel is stuck in transit",
        "the {product} was supposed to arrive {date}",
        "can I pick up my order instead of delivery",
        "is there a tracking number for order {order}",
        "the courier left my {product} at the wrong house",
        "how long does standard delivery take",
        "package lost by {carrier}, what now",
        "can you speed up shipping on my {product}",
        "my delivery is late again",
    ],
    "account_access": [
        "I can't log in to my account",
        "I forgot my password",
        "the reset password email never arrives",
        "my account is locked after too many attempts",
        "two-factor code isn't working on my {device}",
        "I can't sign in on {app_thing}",
        "how do I change the email on my account",
        "someone else may have accessed my account",
        "it says my username doesn't exist",
        "I lost my phone and can't get the verification code",
        "login keeps failing on my {device}",
        "please unlock my account",
        "I get 'invalid credentials' even with the right password",
        "how do I recover an old account",
        "my account was hacked {date}",
        "I can't access my profile anymore",
        "the verification link has expired",
    ],
    "cancel": [
        "I want to cancel my {plan}",
        "please cancel order {order}",
        "how do I stop my {plan} from renewing",
        "cancel my subscription effective today",
        "I no longer need the {product}, cancel the order",
        "can I cancel before it ships",
        "end my {plan} at the end of this month",
        "I'd like to close my account and cancel everything",
        "turn off auto-renewal please",
        "stop billing me, I am cancelling the {plan}",
        "is there a fee to cancel the {plan}",
        "I ordered the {product} by mistake, cancel it",
        "how do I unsubscribe from the {plan}",
        "cancel the order I placed {date}",
        "I want to terminate my membership",
        "please don't renew my {plan}",
    ],
    "technical_issue": [
        "{app_thing} keeps crashing on my {device}",
        "the page won't load",
        "I get an error when I click pay",
        "{app_thing} is very slow today",
        "the {product} won't turn on",
        "the {product} stopped working {date}",
        "buttons don't respond on {app_thing}",
        "I see error 500 on {app_thing}",
        "notifications are not working on my {device}",
        "the update broke {app_thing}",
        "my {product} makes a strange noise",
        "the screen freezes when I open {app_thing}",
        "images don't show up on {app_thing}",
        "the {product} keeps disconnecting from bluetooth",
        "the search bar doesn't return anything",
        "{app_thing} logs me out every few minutes",
        "the firmware update failed on my {product}",
    ],
}

OPENERS = [
    "",
    "",
    "",
    "",
    "hi, ",
    "hello, ",
    "hey ",
    "good morning, ",
    "excuse me, ",
    "quick question: ",
    "urgent: ",
    "hi there! ",
]
CLOSERS = [
    "",
    "",
    "",
    "",
    ".",
    "?",
    "!",
    " please",
    " thanks",
    ", thank you",
    " asap",
    " - can you help?",
    ". this is frustrating",
]


def _fill(template: str, rng: random.Random) -> str:
    """Fills every {slot} of a template with a random value."""
    values = {name: rng.choice(options) for name, options in SLOTS.items()}
    return template.format(**values)


def _vary(text: str, rng: random.Random) -> str:
    """Adds a greeting, a sign-off, and sometimes lower case or a swapped-letter typo."""
    text = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.25 and len(text) > 10:
        i = rng.randrange(1, len(text) - 2)
        text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return text[0].upper() + text[1:] if rng.random() < 0.6 else text


def generate(seed: int = SEED, per_intent: int = PER_INTENT) -> list[dict[str, str]]:
    """The rows, in a deterministic shuffled order, without duplicate texts."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for label, templates in TEMPLATES.items():
        count = 0
        while count < per_intent:
            text = _vary(_fill(rng.choice(templates), rng), rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            count += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).with_name("support-intents.jsonl")
    with out.open("w", encoding="utf-8") as fh:
        for row in generate():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
