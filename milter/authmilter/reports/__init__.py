"""DMARC reporting: the per-message record and the RFC 9990 aggregate report builder.

:mod:`authmilter.reports.record` holds :class:`~authmilter.reports.record.DmarcEvent`, one
DMARC-evaluated message as it will be stored; :mod:`authmilter.reports.aggregate` turns a day of
events into RFC 9990 aggregate reports (XML, gzip, filename, subject, e-mail message). Storage and
sending are not here.
"""

from __future__ import annotations
