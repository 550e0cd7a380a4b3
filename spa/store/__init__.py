"""What lives on disk (STYLE.md's layout): the client store first."""
