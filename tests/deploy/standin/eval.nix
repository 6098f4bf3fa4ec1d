# Evaluates NixOS modules with the STAND-IN lib/pkgs (see lib.nix) and returns what the
# tests assert on. `modules`: paths or attribute sets (the tests pass their own config
# as JSON through builtins.fromJSON).
{ modules }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit lib; };
  config = (lib.evalModules { inherit modules; specialArgs = { inherit pkgs; }; }).config;
  b = builtins;
in
{
  inherit config;
  failedAssertions = map (a: a.message) (b.filter (a: !a.assertion) (config.assertions or [ ]));
  # the files under /etc the modules render: their values (stand-in formats.toml keeps them)
  etc = b.mapAttrs (_: v: v.source.standInValue) (config.environment.etc or { });
}
