"""`lorafleet cookbook rl_loop ...` with one test-only change to the recipe's reward.

    python tests/e2e/cookbook_offline.py [lorafleet cookbook options and key=value ...]

A small model never solves GSM8K: every group would get zero advantages and rl_loop would skip
training, so the reward adds a length-based term to keep variance. Everything else is the
supported `lorafleet cookbook` path (lorafleet/cookbook.py).
"""

from __future__ import annotations

import sys

from tinker_cookbook.recipes import rl_loop

from lorafleet.cli import main

official = rl_loop.get_reward
rl_loop.get_reward = lambda response, answer: official(response, answer) + (len(response) % 3) / 3

if __name__ == "__main__":
    sys.exit(main(["cookbook", "rl_loop", *sys.argv[1:]]))
