"""What each `workbench` subcommand does, one module per area. `app.cli` builds the parser and
names each command's function as "module:function", so a command's heavy imports (torch, the
model adapter) happen only when it runs."""
