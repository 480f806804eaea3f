"""The one tag-list parser (RFC 6376 §3.2) and the three dialects its callers keep: key records
(lenient about empty tag-specs), DKIM-Signature values (strict, errors as permerror reasons)
and DMARC records (names without case, junk skipped with a warning)."""

from __future__ import annotations

import pytest

from authmilter.dkim_verify import SignatureError, parse_signature_tags
from authmilter.dmarc import DmarcRecordError, NotDmarcRecord, parse_record
from authmilter.keys import KeyRecordError, parse_key_record
from authmilter.results import DkimResult
from authmilter.taglist import TagListError, TagListProblem, parse_tag_list

# -- the parser, default (key record) dialect --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("", []),
        (" \t\r\n ", []),
        ("a=1", [("a", "1")]),
        ("a=1;", [("a", "1")]),
        # FWS around names, "=" and ";" goes; inside a value it stays.
        (" a \r\n\t= 1 2 ;\r\n b=x y", [("a", "1 2"), ("b", "x y")]),
        # Empty values are values; "=" inside a value is part of it.
        ("p=; n=a=b", [("p", ""), ("n", "a=b")]),
        # Lenient: empty tag-specs anywhere are skipped.
        (";a=1;; ;b=2;;", [("a", "1"), ("b", "2")]),
        # Case-sensitive names: A and a are two tags.
        ("A=1; a=2", [("A", "1"), ("a", "2")]),
        ("x_1=1; Y9=2", [("x_1", "1"), ("Y9", "2")]),
    ],
)
def test_default_dialect(text: str, pairs: list[tuple[str, str]]) -> None:
    assert parse_tag_list(text) == pairs


@pytest.mark.parametrize(
    ("text", "problem", "index", "spec", "name", "message"),
    [
        ("a=1; k rsa", TagListProblem.NO_EQUALS, 2, "k rsa", "", "tag-spec 'k rsa' has no '='"),
        ("9k=rsa", TagListProblem.BAD_NAME, 1, "9k=rsa", "9k", "invalid tag name '9k'"),
        ("a b=1", TagListProblem.BAD_NAME, 1, "a b=1", "a b", "invalid tag name 'a b'"),
        ("_a=1", TagListProblem.BAD_NAME, 1, "_a=1", "_a", "invalid tag name '_a'"),
        ("=1", TagListProblem.BAD_NAME, 1, "=1", "", "invalid tag name ''"),
        ("é=1", TagListProblem.BAD_NAME, 1, "é=1", "é", "invalid tag name 'é'"),
        ("p=a; p=b", TagListProblem.DUPLICATE, 2, "p=b", "p", "duplicate tag p="),
        ("p=a;; p =b", TagListProblem.DUPLICATE, 3, "p =b", "p", "duplicate tag p="),
    ],
)
def test_default_dialect_errors(text: str, problem: TagListProblem, index: int, spec: str,
                                name: str, message: str) -> None:  # fmt: skip
    with pytest.raises(TagListError) as caught:
        parse_tag_list(text)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.problem, error.index, error.spec, error.name) == (problem, index, spec, name)
    assert str(error) == message


def test_the_first_error_in_order_is_raised() -> None:
    with pytest.raises(TagListError, match="has no '='"):
        parse_tag_list("a=1; junk; a=2; 9=x")


# -- strict_empty: the RFC grammar, one trailing ";" at most ----------------------------------


@pytest.mark.parametrize(
    ("text", "pairs"),
    [("", []), ("  ", []), ("a=1", [("a", "1")]), ("a=1; \r\n ", [("a", "1")])],
)
def test_strict_empty_allows_one_trailing_separator(
        text: str, pairs: list[tuple[str, str]]) -> None:  # fmt: skip
    assert parse_tag_list(text, strict_empty=True) == pairs


@pytest.mark.parametrize(
    ("text", "index"),
    [(";", 1), (";a=1", 1), ("a=1;;", 2), ("a=1;;b=2", 2), ("a=1; ;b=2", 2)],
)
def test_strict_empty_refuses_other_empty_specs(text: str, index: int) -> None:
    with pytest.raises(TagListError) as caught:
        parse_tag_list(text, strict_empty=True)
    assert (caught.value.problem, caught.value.index) == (TagListProblem.EMPTY, index)
    assert str(caught.value) == "empty tag-spec"


def test_strict_empty_reports_problems_in_order() -> None:
    # The empty tag-spec comes after the broken one: the broken one is reported.
    with pytest.raises(TagListError) as caught:
        parse_tag_list("junk;;a=1", strict_empty=True)
    assert caught.value.problem is TagListProblem.NO_EQUALS


# -- fold_case and skip_malformed: the DMARC dialect ------------------------------------------


def test_fold_case_lowercases_names_and_finds_duplicates_across_case() -> None:
    assert parse_tag_list("V=DMARC1; P=Reject", fold_case=True) == [("v", "DMARC1"),
                                                                    ("p", "Reject")]  # fmt: skip
    with pytest.raises(TagListError) as caught:
        parse_tag_list("p=reject; P=none", fold_case=True)
    assert (caught.value.problem, caught.value.name) == (TagListProblem.DUPLICATE, "p")


def test_skip_malformed_reports_and_skips_but_duplicates_still_raise() -> None:
    seen: list[TagListError] = []
    pairs = parse_tag_list("v=DMARC1;; junk ; 9x=1; p=none;", fold_case=True,
                           skip_malformed=seen.append)  # fmt: skip
    assert pairs == [("v", "DMARC1"), ("p", "none")]
    assert [(e.problem, e.index, e.spec) for e in seen] == [
        (TagListProblem.NO_EQUALS, 3, "junk"), (TagListProblem.BAD_NAME, 4, "9x=1")]  # fmt: skip
    with pytest.raises(TagListError) as caught:
        parse_tag_list("p=none; junk; p=reject", skip_malformed=lambda e: None)
    assert caught.value.problem is TagListProblem.DUPLICATE


# -- each caller keeps its dialect ------------------------------------------------------------


def test_key_records_are_lenient_about_empty_specs_and_say_key_record_syntax() -> None:
    assert parse_key_record("v=DKIM1;; k=ed25519; ;p=;").revoked
    with pytest.raises(KeyRecordError, match=r"^key record syntax: duplicate tag p=$"):
        parse_key_record("v=DKIM1; p=; p=")
    with pytest.raises(KeyRecordError, match=r"^key record syntax: tag-spec 'k' has no '='$"):
        parse_key_record("v=DKIM1; k; p=")
    # Names are case-sensitive: P= is an unknown tag, so p= is missing.
    with pytest.raises(KeyRecordError, match="missing p="):
        parse_key_record("v=DKIM1; P=")


def _dkim_reason(text: str) -> str:
    with pytest.raises(SignatureError) as caught:
        parse_signature_tags(text)
    assert caught.value.result is DkimResult.PERMERROR
    return caught.value.reason


def test_signatures_are_strict_and_quote_hostile_text_short() -> None:
    assert parse_signature_tags("v=1; d=example.com;") == {"v": "1", "d": "example.com"}
    assert parse_signature_tags("D=a; d=b") == {"D": "a", "d": "b"}
    assert _dkim_reason("v=1;; d=x") == "empty tag-spec (RFC 6376 §3.2)"
    assert _dkim_reason(";v=1") == "empty tag-spec (RFC 6376 §3.2)"
    assert _dkim_reason("v=1; d=a; d=b") == "duplicate tag 'd' (RFC 6376 §3.2)"
    assert _dkim_reason("v=1; x\u00e9") == "tag-spec 'x\\xe9' has no '=' (RFC 6376 §3.2)"
    assert _dkim_reason("v=1; 9d=x") == "invalid tag name '9d' (RFC 6376 §3.2)"
    long = _dkim_reason("v=1; " + "x" * 500)
    assert long.startswith("tag-spec 'xxx") and "...' has no '='" in long and len(long) < 200


def test_dmarc_records_fold_case_and_skip_junk_with_a_warning() -> None:
    record = parse_record("V=DMARC1;; junk ;P=Reject; 9x=1 ;")
    assert record.p.value == "reject"
    assert dict(record.tags) == {"v": "DMARC1", "p": "Reject"}
    assert record.warnings == ("tag 3 'junk' is not name=value; ignored",
                               "tag 5 '9x=1' is not name=value; ignored")  # fmt: skip
    with pytest.raises(DmarcRecordError, match=r"^tag p= appears more than once"):
        parse_record("v=DMARC1; junk; p=reject; P=none")
    with pytest.raises(DmarcRecordError, match=r"^tag v= appears more than once"):
        parse_record("v=DMARC1; p=reject; V=DMARC1")
    # The version comes first and is checked before anything else: no duplicate error for a
    # record that is not DMARC at all, and no empty tag-spec before v=.
    with pytest.raises(NotDmarcRecord):
        parse_record("v=spf1; p=a; p=b")
    with pytest.raises(NotDmarcRecord):
        parse_record("; v=DMARC1; p=none")
