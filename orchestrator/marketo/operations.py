"""Marketo's Bulk Import operations by name, and the route-level dispatchers.

`Operations` shapes each of the twelve Bulk Import operations of
`shared/marketo-openapi/swagger-mapi.json` (import, status, failures and warnings
for leads, custom objects and program members) and the three describe calls into
a path, parameters and an operation id, and hands it to one of four exchanges
(`_upload`, `_status`, `_get`, `_download`) that `MarketoClient` (`marketo.bulk`)
implements with its token, limits and retries. The dispatchers pick the operation
for a route's object, for the scheduler and the poller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import config
from orchestrator.marketo.wire import (
    CUSTOM_OBJECT_FAILURES,
    CUSTOM_OBJECT_STATUS,
    CUSTOM_OBJECT_WARNINGS,
    DESCRIBE_CUSTOM_OBJECT,
    DESCRIBE_LEADS,
    DESCRIBE_PROGRAM_MEMBERS,
    IMPORT_CUSTOM_OBJECTS,
    IMPORT_LEADS,
    IMPORT_PROGRAM_MEMBERS,
    LEAD_FAILURES,
    LEAD_STATUS,
    LEAD_WARNINGS,
    PROGRAM_MEMBER_FAILURES,
    PROGRAM_MEMBER_STATUS,
    PROGRAM_MEMBER_WARNINGS,
    Description,
    custom_object_describe_path,
    custom_object_root,
    description,
)
from orchestrator.models import BatchStatus, ObjectType


class Operations:
    """The operations by name; the exchanges are the client's."""

    async def _upload(
        self, operation: str, url_path: str, params: dict[str, str], file: Path, fmt: str
    ) -> BatchStatus:
        raise NotImplementedError

    async def _status(self, operation: str, url_path: str) -> BatchStatus:
        raise NotImplementedError

    async def _get(self, operation: str, url_path: str) -> Any:
        raise NotImplementedError

    async def _download(self, operation: str, url_path: str, dest: Path) -> bool:
        raise NotImplementedError

    # -- Leads -------------------------------------------------------------

    async def import_leads(
        self,
        path: Path,
        fmt: str,
        *,
        lookup_field: str = "",
        partition_name: str = "",
        list_id: int = 0,
    ) -> BatchStatus:
        params = {"format": fmt.lower()}
        if lookup_field:
            params["lookupField"] = lookup_field
        if partition_name:
            params["partitionName"] = partition_name
        if list_id:
            params["listId"] = str(list_id)
        return await self._upload(IMPORT_LEADS, "/bulk/v1/leads.json", params, path, fmt)

    async def lead_import_status(self, batch_id: int) -> BatchStatus:
        return await self._status(LEAD_STATUS, f"/bulk/v1/leads/batch/{int(batch_id)}.json")

    async def lead_import_failures(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/leads/batch/{int(batch_id)}/failures.json"
        return await self._download(LEAD_FAILURES, path, dest)

    async def lead_import_warnings(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/leads/batch/{int(batch_id)}/warnings.json"
        return await self._download(LEAD_WARNINGS, path, dest)

    # -- Custom objects ----------------------------------------------------

    async def import_custom_objects(self, api_name: str, path: Path, fmt: str) -> BatchStatus:
        url_path = f"{custom_object_root(api_name)}.json"
        params = {"format": fmt.lower()}
        return await self._upload(IMPORT_CUSTOM_OBJECTS, url_path, params, path, fmt)

    async def custom_object_import_status(self, api_name: str, batch_id: int) -> BatchStatus:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/status.json"
        return await self._status(CUSTOM_OBJECT_STATUS, path)

    async def custom_object_import_failures(self, api_name: str, batch_id: int, dest: Path) -> bool:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/failures.json"
        return await self._download(CUSTOM_OBJECT_FAILURES, path, dest)

    async def custom_object_import_warnings(self, api_name: str, batch_id: int, dest: Path) -> bool:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/warnings.json"
        return await self._download(CUSTOM_OBJECT_WARNINGS, path, dest)

    # -- Program members ---------------------------------------------------

    async def import_program_members(
        self, program_id: int, status: str, path: Path, fmt: str
    ) -> BatchStatus:
        url_path = f"/bulk/v1/program/{int(program_id)}/members/import.json"
        params = {"programMemberStatus": status, "format": fmt.upper()}
        return await self._upload(IMPORT_PROGRAM_MEMBERS, url_path, params, path, fmt)

    async def program_member_import_status(self, batch_id: int) -> BatchStatus:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/status.json"
        return await self._status(PROGRAM_MEMBER_STATUS, path)

    async def program_member_import_failures(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/failures.json"
        return await self._download(PROGRAM_MEMBER_FAILURES, path, dest)

    async def program_member_import_warnings(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/warnings.json"
        return await self._download(PROGRAM_MEMBER_WARNINGS, path, dest)

    # -- Describe: the fields an import header may name ----------------------

    async def describe_leads(self) -> Description:
        """Lead fields (Describe Lead2), with the fields leads can be looked up by."""
        return description(
            await self._get(DESCRIBE_LEADS, "/rest/v1/leads/describe2.json"), DESCRIBE_LEADS
        )

    async def describe_custom_object(self, api_name: str) -> Description:
        """A custom object's fields, its dedupe fields and its id field."""
        path = custom_object_describe_path(api_name)
        return description(await self._get(DESCRIBE_CUSTOM_OBJECT, path), DESCRIBE_CUSTOM_OBJECT)

    async def describe_program_members(self) -> Description:
        """Program member fields (a file may also name lead fields: see `describe_leads`)."""
        path = "/rest/v1/programs/members/describe.json"
        return description(
            await self._get(DESCRIBE_PROGRAM_MEMBERS, path), DESCRIBE_PROGRAM_MEMBERS
        )

    # -- Route-level dispatchers -------------------------------------------

    async def submit(self, route: config.Route, path: Path, fmt: str) -> BatchStatus:
        """Create the import job for one chunk file of `route`."""
        match route.object:
            case ObjectType.LEADS:
                return await self.import_leads(
                    path,
                    fmt,
                    lookup_field=route.lookup_field,
                    partition_name=route.partition_name,
                    list_id=route.list_id,
                )
            case ObjectType.CUSTOM_OBJECT:
                return await self.import_custom_objects(route.api_name, path, fmt)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.import_program_members(
                    route.program_id, route.program_member_status, path, fmt
                )

    async def status(self, route: config.Route, batch_id: int) -> BatchStatus:
        """The job's current status."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_status(batch_id)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_status(route.api_name, batch_id)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_status(batch_id)

    async def download_failures(self, route: config.Route, batch_id: int, dest: Path) -> bool:
        """Stream the job's failures file to `dest`; False when Marketo has none (404)."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_failures(batch_id, dest)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_failures(route.api_name, batch_id, dest)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_failures(batch_id, dest)

    async def download_warnings(self, route: config.Route, batch_id: int, dest: Path) -> bool:
        """Stream the job's warnings file to `dest`; False when Marketo has none (404)."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_warnings(batch_id, dest)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_warnings(route.api_name, batch_id, dest)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_warnings(batch_id, dest)
