"""Small data files shipped with the built-in environments (generated catalogs, task lists)."""
