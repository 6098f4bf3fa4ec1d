# Calls the top-level flake.nix's `outputs` with STAND-IN inputs: nixpkgs is lib.nix and
# pkgs.nix of this directory (for both systems), `self` is the outputs plus the source path.
{ root }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit lib; };
  nixpkgs = {
    inherit lib;
    legacyPackages = { x86_64-linux = pkgs; aarch64-linux = pkgs; };
  };
  flake = import (root + "/flake.nix");
  self = flake.outputs { inherit self nixpkgs; } // { outPath = toString root; };
in
{
  inherit flake self lib pkgs;
}
