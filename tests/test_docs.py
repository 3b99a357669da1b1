"""The README and docs/*.md: every relative link names a file that exists and, with a
#fragment, a heading of that file (GitHub's anchor rule)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(
    os.path.join(ROOT, "docs")) if f.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces -> '-';
  repeated headings get -1, -2, ..."""
  out, seen = set(), {}
  in_code = False
  for line in open(path, encoding="utf-8"):
    if line.startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      text = re.sub(r"`|\*|\[|\]\([^)]*\)", "", m.group(1)).strip().lower()
      slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f"{slug}-{n}")
  return out


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  src = os.path.join(ROOT, page)
  text = re.sub(r"```.*?```", "", open(src, encoding="utf-8").read(), flags=re.S)
  bad = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+://|mailto:", target):
      continue
    path, _, frag = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(src), path)) if path else src
    if not os.path.exists(dest):
      bad.append(f"{target}: no file {os.path.relpath(dest, ROOT)}")
    elif frag and dest.endswith(".md") and frag not in anchors(dest):
      bad.append(f"{target}: no heading #{frag} in {os.path.relpath(dest, ROOT)}")
  assert not bad, f"{page}: " + "; ".join(bad)
