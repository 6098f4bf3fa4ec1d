{
  description = "Circus demo: a few jobs that build with /bin/sh, no nixpkgs, no network";

  outputs = { self }:
    let
      # Flakes evaluate purely, so the system is spelled out; change it on other hosts.
      system = "x86_64-linux";
      # meta is not a derivation attribute: it sits beside it, as in nixpkgs
      shell = name: script: meta: derivation {
        inherit name system;
        builder = "/bin/sh";
        args = [ "-c" "export PATH=/usr/bin:/bin; ${script}" ];
      } // { inherit meta; };

      greeting = shell "greeting" ''
        echo "building the greeting"
        mkdir -p $out/share
        echo "Hello from Circus" > $out/share/greeting.txt
      '' { };

      hello = shell "hello" ''
        echo "hello uses ${greeting}"
        mkdir -p $out/bin $out/nix-support
        printf '#!/bin/sh\ncat ${greeting}/share/greeting.txt\n' > $out/bin/hello
        chmod +x $out/bin/hello
        echo "file binary-dist $out/bin/hello" > $out/nix-support/hydra-build-products
        echo "hello.size 42 bytes" > $out/nix-support/hydra-metrics
      '' { meta = { description = "Prints a greeting"; license = "MIT"; }; };

      slow = shell "slow-counter" ''
        for i in 1 2 3 4 5; do echo "step $i of 5"; sleep 1; done
        echo done > $out
      '' { };
    in {
      hydraJobs = {
        inherit greeting hello slow;
        release = derivation {
          name = "release";
          inherit system;
          builder = "/bin/sh";
          args = [ "-c" "echo ${hello} ${slow} > $out" ];
          _hydraAggregate = true;
          constituents = [ hello slow ];
        };
      };
    };
}
