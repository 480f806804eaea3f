"""The ``tag=value;`` list of DKIM (RFC 6376 §3.2), which DMARC records share (RFC 7489 §6.4).

One parser for DKIM-Signature values (``dkim_verify``), DKIM key records (``keys``) and DMARC
policy records (``dmarc``)::

    tag-list  =  tag-spec *( ";" tag-spec ) [ ";" ]
    tag-spec  =  [FWS] tag-name [FWS] "=" [FWS] tag-value [FWS]
    tag-name  =  ALPHA *ALNUMPUNC          ; ALNUMPUNC = ALPHA / DIGIT / "_"

White space and folding around names, ``=`` and ``;`` are dropped; inside a value it is kept
(each caller knows what a value may hold). An empty value (``p=``) is a value. The callers
differ only where the keyword arguments say: how strictly empty tag-specs are refused, whether
tag names are case-sensitive, and whether a tag-spec that is not ``name=value`` is an error or
skipped. A repeated tag name is always an error: "if a tag name does occur more than once, the
entire tag-list is invalid" (RFC 6376 §3.2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum

__all__ = ["TagListError", "TagListProblem", "parse_tag_list"]

# RFC 6376 §2.8 FWS, leniently: any mix of white space and line ends.
_FWS = " \t\r\n"
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")  # RFC 6376 §3.2 tag-name


class TagListProblem(StrEnum):
    """What is wrong with a tag-list."""

    EMPTY = "empty"  # an empty tag-spec: ";;", a leading ";" (only with strict_empty)
    NO_EQUALS = "no-equals"  # a tag-spec without "="
    BAD_NAME = "bad-name"  # a tag name that is not ALPHA *ALNUMPUNC
    DUPLICATE = "duplicate"  # a tag name seen before (after case folding, with fold_case)


class TagListError(ValueError):
    """A tag-list that does not parse. The message is a plain description; callers that word
    their errors otherwise use the attributes.

    :ivar problem: what is wrong.
    :ivar index: the 1-based position of the tag-spec in the list (empty tag-specs count).
    :ivar spec: the tag-spec, white space around it removed.
    :ivar name: the tag name (white space removed, folded with ``fold_case``), or ``""``
        for an empty tag-spec or one without ``=``.
    """

    def __init__(self, problem: TagListProblem, *, index: int, spec: str, name: str = "") -> None:
        self.problem = problem
        self.index = index
        self.spec = spec
        self.name = name
        if problem is TagListProblem.EMPTY:
            message = "empty tag-spec"
        elif problem is TagListProblem.NO_EQUALS:
            message = f"tag-spec {spec!r} has no '='"
        elif problem is TagListProblem.BAD_NAME:
            message = f"invalid tag name {name!r}"
        else:
            message = f"duplicate tag {name}="
        super().__init__(message)


def parse_tag_list(
    text: str,
    *,
    strict_empty: bool = False,
    fold_case: bool = False,
    skip_malformed: Callable[[TagListError], None] | None = None,
) -> list[tuple[str, str]]:
    """Split a tag-list into ``(name, value)`` pairs, in order, names unique.

    :param strict_empty: as the RFC 6376 §3.2 grammar: one trailing ``;`` at most, any other
        empty tag-spec (``a=1;;b=2``, a leading ``;``) is an error. Without it (the default)
        empty tag-specs are skipped wherever they are. Empty or blank text is an empty list
        either way.
    :param fold_case: tag names are lowercased, so ``P=`` and ``p=`` are the same tag (DMARC;
        RFC 7489 §6.4 quotes its tag names, and RFC 5234 §2.3 quoted strings are
        case-insensitive). Without it names are case-sensitive (RFC 6376 §3.2).
    :param skip_malformed: called with the error for a tag-spec that is not ``name=value``
        (no ``=``, or an invalid name), which is then skipped instead of raising (DMARC: RFC
        7489 §6.3 discards syntax errors). Duplicates still raise.
    :raises TagListError: an empty tag-spec (with ``strict_empty``), a tag-spec that is not
        ``name=value`` (without ``skip_malformed``), or a repeated tag name.
    """
    specs = text.split(";")
    if strict_empty and not specs[-1].strip(_FWS):
        specs.pop()  # tag-list = tag-spec *( ";" tag-spec ) [ ";" ]
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, raw in enumerate(specs, start=1):
        spec = raw.strip(_FWS)
        if not spec:
            if strict_empty:
                raise TagListError(TagListProblem.EMPTY, index=index, spec=spec)
            continue
        name, eq, value = raw.partition("=")
        name = name.strip(_FWS)
        error = None
        if not eq:
            error = TagListError(TagListProblem.NO_EQUALS, index=index, spec=spec)
        elif not _TAG_NAME.match(name):
            error = TagListError(TagListProblem.BAD_NAME, index=index, spec=spec, name=name)
        if error is not None:
            if skip_malformed is None:
                raise error
            skip_malformed(error)
            continue
        if fold_case:
            name = name.lower()
        if name in seen:
            # RFC 6376 §3.2: "Tags with duplicate names MUST NOT occur within a single
            # tag-list; if a tag name does occur more than once, the entire tag-list is invalid."
            raise TagListError(TagListProblem.DUPLICATE, index=index, spec=spec, name=name)
        seen.add(name)
        pairs.append((name, value.strip(_FWS)))
    return pairs
