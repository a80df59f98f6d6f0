"""A table of descriptions by name (bnsuite's datasets, its networks) that a plugin's registration and a record's
own description join, without importing torch.

A record of a plugin's dataset or network carries its description, so it
loads where the plugin is not installed: reading it adds the description to
the table (`remember`). A plugin imported later takes the name over where its
registration agrees (`add`); two descriptions of one name that disagree on what
a run depends on are refused, naming both.
"""

from __future__ import annotations

from typing import Any


class DescriptionConflict(ValueError):
    """Two descriptions of one name disagree on what a run depends on; the message names both."""


class Descriptions(dict):
    """name -> description (each has `name`, `source` and `conflict(other) -> str | None`): bnsuite's own, then those
    plugins register and records describe. `kind` names them in messages ("dataset"); `made_with` says what records
    that disagree were made with ("other data")."""

    def __init__(self, kind: str, made_with: str, entries: dict[str, Any]):
        super().__init__(entries)
        self.kind, self.made_with = kind, made_with
        self.from_records: set[str] = set()  # names here only because records described them (`remember`)

    def add(self, described: Any) -> None:
        """Put a plugin's registration in the table. A name already registered is refused, naming both sources; one
        known only from records read before is taken over where the two agree (else DescriptionConflict)."""
        known = self.get(described.name)
        if known is not None and described.name not in self.from_records:
            raise DescriptionConflict(f"{self.kind} {described.name!r} is registered twice ({known.source} and "
                                      f"{described.source}); give the new one another name")
        if known is not None and known.conflict(described):
            raise DescriptionConflict(f"{self.kind} {described.name!r} of {described.source} differs from the records "
                                      f"read before ({known.conflict(described)}); they were made with "
                                      f"{self.made_with}")
        self.from_records.discard(described.name)
        self[described.name] = described

    def remember(self, described: Any, *, source: str) -> None:
        """A record's description (`source` names the record): added where no plugin of this process registered the
        name, so the record loads without it; where one did, the two must agree, else DescriptionConflict."""
        known = self.get(described.name)
        if known is None:
            self[described.name] = described
            self.from_records.add(described.name)
            return
        difference = known.conflict(described)
        if difference:
            raise DescriptionConflict(f"{source} describes the {self.kind} {described.name!r} otherwise than "
                                      f"{known.source} registers it here ({difference}); its records were made with "
                                      f"{self.made_with}: keep them in a results directory of their own")

    def snapshot(self) -> tuple[dict[str, Any], set[str]]:
        return dict(self), set(self.from_records)

    def restore(self, snapshot: tuple[dict[str, Any], set[str]]) -> None:
        """The table as `snapshot()` found it (in place: modules hold it)."""
        entries, from_records = snapshot
        self.clear()
        self.update(entries)
        self.from_records = set(from_records)
