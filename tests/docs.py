"""Code blocks of the README and docs/, by name, for the tests that run them.

A block is named by an HTML comment on the line before it:

    <!-- block: example-run -->
    ```bash
    python main.py ...
    ```

A test runs `docs.block('docs/writing-a-trainer.md', 'example-run')`, so what
it runs is what the page prints. tests/docs_test.py checks that every python
and bash block is either named and run by a test, or starts with a comment
saying it is illustrative.
"""

import os
import re

from tests import runner

BLOCK = re.compile(r'(?:<!-- block: ([\w-]+) -->\n)?```(\w*)\n(.*?)```', re.S)


def pages() -> list[str]:
  """README.md and every page under docs/, relative to the repository."""
  docs = os.path.join(runner.REPO, 'docs')
  return ['README.md'] + sorted(
      os.path.join('docs', f) for f in os.listdir(docs) if f.endswith('.md'))


def blocks(page: str) -> list[tuple[str | None, str, str]]:
  """(name or None, language, code) of every fenced block of `page`."""
  with open(os.path.join(runner.REPO, page), encoding='utf-8') as f:
    text = f.read()
  return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def block(page: str, name: str) -> str:
  """The code of block `name` of `page`."""
  found = [code for n, _, code in blocks(page) if n == name]
  assert len(found) == 1, f'{page} has {len(found)} blocks named {name!r}'
  return found[0]


def commands(page: str, name: str) -> list[str]:
  """The shell commands of a bash block, continuation lines joined."""
  text = block(page, name).replace('\\\n', ' ')
  return [' '.join(line.split()) for line in text.splitlines()
          if line.strip() and not line.lstrip().startswith('#')]
