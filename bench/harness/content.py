"""Message contents as people type them, from a seeded generator: mostly short chat
lines, some paragraphs, a few long pastes with line breaks, some Korean and emoji; about
180 characters on average."""

from __future__ import annotations

import random

WORDS = (
    "the deploy went out at noon and the latency graph looks fine but the queue depth on "
    "the second worker keeps climbing can you check whether the retry job picked up the "
    "stale sessions from yesterday I think the migration left some rows pending we should "
    "roll back if the error rate goes above one percent thanks sounds good will do after "
    "lunch meeting moved to three tomorrow"
).split()
KOREAN = ["안녕하세요", "확인했습니다", "내일 다시 연락드릴게요", "감사합니다", "회의록 공유합니다"]
EMOJI = ["👍", "🎉", "🙏", "😅", "🚀"]


def chat_line(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.70:
        count = rng.randint(3, 18)
    elif roll < 0.95:
        count = rng.randint(25, 70)
    else:
        count = rng.randint(150, 400)  # a pasted log or a long explanation
    words = [rng.choice(WORDS) for _ in range(count)]
    if count > 100:
        for at in range(40, count, rng.randint(30, 60)):
            words[at] += "\n"
    text = " ".join(words).replace("\n ", "\n")
    if rng.random() < 0.08:
        text = f"{rng.choice(KOREAN)} {text}"
    if rng.random() < 0.10:
        text += f" {rng.choice(EMOJI)}"
    return text[0].upper() + text[1:]
