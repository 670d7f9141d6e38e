"""Who may connect and how: the allow list, auth tokens and TLS, as one unit.

L{SecurityConfig} is what an operator wrote (paths, networks, switches);
L{Security} is what a running server holds, built from it: the allow list,
the token set, and one reloadable TLS context per TLS port and for
C{STARTTLS}.  Building it reads and checks every file, so a bad file stops
the server at start, with the file named.  L{Security.reload} reads them
all again (SIGHUP); a file that became unusable is logged and the one in
memory stays in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from lineserver.access import AllowList, TokenFileError, TokenSet
from lineserver.admission import AdmissionPolicy
from lineserver.tls import (
    ReloadableServerTLS,
    TLSConfigError,
    is_ssl_description,
    ssl_server_endpoint,
)

log = Logger(namespace="lineserver.security")


class SecurityConfigError(ValueError):
    """
    The security options contradict each other or name unusable files.
    """


@dataclass(frozen=True)
class SecurityConfig:
    """
    The access rules of a server; the defaults admit everyone, in plaintext.

    @ivar allow: networks (CIDR or single addresses) whose clients may
        connect; None admits every address.  An empty sequence admits none.
    @ivar auth_tokens: a file of tokens; clients must start with
        C{AUTH <token>}.  None: no authentication.
    @ivar tls_cert: certificate (and chain) PEM for C{STARTTLS}.
    @ivar tls_key: its key; defaults to C{tls_cert} (a combined PEM file).
    @ivar tls_client_ca: CAs that client certificates must chain to (mutual
        TLS), on C{ssl:} ports and after C{STARTTLS}.
    @ivar starttls: offer C{STARTTLS} on plain ports.
    @ivar require_tls: refuse every line sent before TLS is on.
    """

    allow: Sequence[str] | None = None
    auth_tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    starttls: bool = False
    require_tls: bool = False

    def check(self, ports: Sequence[str]) -> None:
        """
        Refuse combinations that cannot work, before any file is read.

        @raise SecurityConfigError: naming the options at fault.
        """
        tls_ports = [p for p in ports if is_ssl_description(p)]
        if self.starttls and self.tls_cert is None:
            raise SecurityConfigError("--starttls needs --tls-cert (and --tls-key)")
        if not self.starttls and (self.tls_cert or self.tls_key):
            raise SecurityConfigError(
                "--tls-cert and --tls-key are for --starttls; a TLS port names "
                "its own: --port ssl:4443:privateKey=KEY.pem:certKey=CERT.pem"
            )
        if self.tls_client_ca and not (self.starttls or tls_ports):
            raise SecurityConfigError(
                "--tls-client-ca needs a TLS port (--port ssl:...) or --starttls"
            )
        if self.require_tls and not (self.starttls or tls_ports):
            raise SecurityConfigError(
                "--require-tls would refuse every client: add --starttls or a "
                "TLS port (--port ssl:...)"
            )


class Security:
    """
    The live access rules of one server.

    @ivar allow_list: None when every address may connect.
    @ivar tokens: None when no C{AUTH} is required.
    @ivar starttls: the context C{STARTTLS} upgrades with, or None.
    @ivar port_contexts: the context of each TLS port, by its description.
    """

    def __init__(self, config: SecurityConfig) -> None:
        """
        @raise SecurityConfigError: a network, token file or TLS file is
            unusable; the message names it.
        """
        self.config = config
        try:
            self.allow_list = None if config.allow is None else AllowList(config.allow)
            self.tokens = (
                None
                if config.auth_tokens is None
                else TokenSet.from_file(config.auth_tokens)
            )
            self.starttls = (
                None
                if not config.starttls or config.tls_cert is None
                else ReloadableServerTLS(
                    config.tls_cert,
                    config.tls_key or config.tls_cert,
                    config.tls_client_ca,
                )
            )
        except (TLSConfigError, ValueError) as error:
            raise SecurityConfigError(str(error)) from error
        self.port_contexts: dict[str, ReloadableServerTLS] = {}

    def policy(self) -> AdmissionPolicy:
        """
        @return: who may connect and the rules for each connection's first
            lines, for L{lineserver.protocol.LineFactory}.
        """
        return AdmissionPolicy(
            starttls=self.starttls is not None,
            require_tls=self.config.require_tls,
            check_token=None if self.tokens is None else self.tokens.check,
            allow=None if self.allow_list is None else self.allow_list.allows,
            starttls_context=self.starttls,
        )

    def endpoint(self, reactor: Any, description: str) -> IStreamServerEndpoint | None:
        """
        The endpoint of a TLS port, listening with a reloadable context
        (and the client CAs); None for a port that is not TLS, which
        Twisted's parser makes as usual.

        @raise SecurityConfigError: the description or its files are unusable.
        """
        if not is_ssl_description(description):
            return None
        try:
            endpoint, context = ssl_server_endpoint(
                reactor, description, self.config.tls_client_ca
            )
        except (TLSConfigError, ValueError) as error:
            raise SecurityConfigError(f"--port {description}: {error}") from error
        self.port_contexts[description] = context
        return endpoint

    def log_contexts(self) -> None:
        """
        Say which certificate each TLS context serves, and whether it asks
        for client certificates.
        """
        for name, context in self._contexts().items():
            log.info(
                "TLS for {name}: {certificate}{mutual}",
                name=name,
                certificate=context.describe(),
                mutual="; client certificates required" if context.mutual else "",
            )

    def _contexts(self) -> dict[str, ReloadableServerTLS]:
        contexts = dict(self.port_contexts)
        if self.starttls is not None:
            contexts["STARTTLS"] = self.starttls
        return contexts

    def reload(self) -> bool:
        """
        Read every certificate, key, CA and token file again; use what
        loads for new connections, keep the old for what does not.

        @return: True if everything was reloaded.
        """
        ok = True
        for name, context in self._contexts().items():
            try:
                context.reload()
            except TLSConfigError as error:
                ok = False
                log.error(
                    "could not reload TLS for {name}: {error}; keeping the "
                    "certificate in use ({certificate})",
                    name=name,
                    error=str(error),
                    certificate=context.describe(),
                )
            else:
                log.info(
                    "reloaded TLS for {name}: {certificate}",
                    name=name,
                    certificate=context.describe(),
                )
        if self.tokens is not None:
            try:
                count = self.tokens.reload()
            except TokenFileError as error:
                ok = False
                log.error(
                    "could not reload auth tokens: {error}; keeping the "
                    "{count} token(s) in use",
                    error=str(error),
                    count=len(self.tokens),
                )
            else:
                log.info(
                    "reloaded auth tokens from {path}: {count} token(s)",
                    path=str(self.tokens.path),
                    count=count,
                )
        return ok
