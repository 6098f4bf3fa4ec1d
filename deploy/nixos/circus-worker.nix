# NixOS module: services.circus-worker — a remote Celery build worker (circus-worker,
# docs/DISTRIBUTED.md "Celery workers on other hosts"). It consumes the build queues of
# its systems/features from the network broker, claims and reports through the
# server's /api/v1/workers and substitutes inputs from the server's /nix-cache into
# this host's own Nix store, through the Nix daemon. It holds no database password.
# The token (and a broker URL with a password) are read from files at start, never
# copied into the Nix store.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.circus-worker;
  inherit (lib) mkOption mkEnableOption mkIf mkDefault types;

  settingsFormat = pkgs.formats.toml { };
  settingsFile = settingsFormat.generate "circus-worker.toml" cfg.settings;

  inlineToken = lib.attrByPath [ "worker" "token" ] null cfg.settings != null;
  scheme = url: builtins.head (builtins.match "([a-z0-9+]*)://.*|.*" url ++ [ null ]);
  urlHasPassword = url: url != null && builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]+@.*" url != null;
  optionalKey = name: value: lib.optionalAttrs (value != null) { ${name} = value; };
  features = cfg.features ++ cfg.mandatoryFeatures;

  # ProtectSystem=strict leaves only the state directory writable: a work_dir elsewhere
  # (which must exist) is added
  stateDir = "/var/lib/circus-worker";
  workDir = lib.attrByPath [ "worker" "work_dir" ] stateDir cfg.settings;
  writablePaths = lib.optional (workDir != stateDir && !(lib.hasPrefix "${stateDir}/" workDir)) workDir;
in
{
  options.services.circus-worker = {
    enable = mkEnableOption "a Circus remote build worker (circus-worker)";

    package = mkOption {
      type = types.package;
      description = "The worker package (the flake's packages.<system>.circus-worker).";
    };

    user = mkOption {
      type = types.str;
      default = "circus-worker";
      description = "User the worker runs as (a system user with its own group).";
    };

    serverUrl = mkOption {
      type = types.str;
      example = "https://ci.example.org";
      description = "The circus-server the worker claims through (http:// or https://).";
    };

    tokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/circus-worker-token";
      description = ''
        File holding the worker's token (its SHA-256 digest is in the server's
        remote_workers.auth_tokens). Read at start; never copied into the Nix store.
      '';
    };

    brokerUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "redis://broker.example.org:6379/0";
      description = ''
        The Celery broker the queue runner publishes wake-ups on, without a password
        (one with a password goes in brokerUrlFile).
      '';
    };

    brokerUrlFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/circus-broker-url";
      description = "Instead of brokerUrl: a file holding the broker URL (with its password).";
    };

    cachePublicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "ci.example.org-1:0123456789abcdefghijklmnopqrstuvwxyzABCDEFG=";
      description = ''
        Pin of the server's cache signing key (worker.cache_public_key): the worker
        refuses to start when the server announces another key. When set, it is added
        to the Nix daemon's trusted-public-keys, so the worker's user need not be a
        trusted user (see trustedUser).
      '';
    };

    trustedUser = mkOption {
      type = types.bool;
      default = cfg.cachePublicKey == null;
      defaultText = lib.literalExpression "config.services.circus-worker.cachePublicKey == null";
      description = ''
        Make the worker's user a trusted user of the Nix daemon. The worker imports
        inputs signed by the server's cache key: without a pinned cachePublicKey (which
        goes into trusted-public-keys) the daemon accepts that key only from a trusted
        user. A trusted user's [nix] settings (sandbox, substituters) also apply; an
        untrusted user's are ignored by the daemon, which uses nix.conf's.
      '';
    };

    name = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "The worker's name, unique per installation (default: the host name).";
    };

    systems = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "x86_64-linux" "i686-linux" ];
      description = "Systems this worker builds for (default: this host's).";
    };

    features = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "kvm" "big-parallel" ];
      description = "System features this host offers.";
    };

    mandatoryFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Features a step must ask for to be built here.";
    };

    slots = mkOption {
      type = types.positiveInt;
      default = 1;
      description = "Builds at once (Celery pool threads).";
    };

    caFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "CA bundle that verifies the server's certificate (default: system CAs).";
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      description = ''
        Further worker settings (the [worker], [nix] and [tracing] tables of
        circus/worker/config.py), merged with the options above and rendered to
        /etc/circus/worker.toml. No secrets inline.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.tokenFile != null;
        message = "services.circus-worker: set tokenFile (the worker's token, read at start)";
      }
      {
        # a Nix path literal (tokenFile = ./token) would be copied into the store when
        # the settings are rendered: only a path string ("/run/secrets/...") stays outside
        assertion = !(builtins.isPath cfg.tokenFile || builtins.isPath cfg.brokerUrlFile);
        message = "services.circus-worker: tokenFile and brokerUrlFile must be path strings "
          + "(\"/run/secrets/...\"), not Nix path literals, which copy the file into the "
          + "world-readable Nix store";
      }
      {
        assertion = !inlineToken;
        message = "services.circus-worker: the token must be given by tokenFile, not "
          + "settings.worker.token (it would be copied into the world-readable Nix store)";
      }
      {
        assertion = builtins.elem (scheme cfg.serverUrl) [ "http" "https" ];
        message = "services.circus-worker: serverUrl must be an http(s) URL (got ${cfg.serverUrl})";
      }
      {
        assertion = (cfg.brokerUrl != null) != (cfg.brokerUrlFile != null);
        message = "services.circus-worker: set exactly one of brokerUrl and brokerUrlFile";
      }
      {
        assertion = !urlHasPassword cfg.brokerUrl
          && !urlHasPassword (lib.attrByPath [ "worker" "broker_url" ] null cfg.settings);
        message = "services.circus-worker: a broker URL with a password must be given by "
          + "brokerUrlFile (it would be copied into the world-readable Nix store)";
      }
    ];

    services.circus-worker.settings.worker = {
      server_url = cfg.serverUrl;
      slots = mkDefault cfg.slots;
      features = mkDefault cfg.features;
      mandatory_features = mkDefault cfg.mandatoryFeatures;
      work_dir = mkDefault stateDir;
    }
    // optionalKey "token_file" cfg.tokenFile
    // optionalKey "broker_url" cfg.brokerUrl
    // optionalKey "broker_url_file" cfg.brokerUrlFile
    // optionalKey "cache_public_key" cfg.cachePublicKey
    // optionalKey "name" cfg.name
    // optionalKey "systems" cfg.systems
    // optionalKey "ca_file" cfg.caFile;

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      home = stateDir;
      description = "Circus remote build worker";
    };
    users.groups.${cfg.user} = { };

    nix.settings = {
      trusted-users = lib.optional cfg.trustedUser cfg.user;
      trusted-public-keys = lib.optional (cfg.cachePublicKey != null) cfg.cachePublicKey;
      # the daemon builds, so it must offer the features the worker announces: the
      # worker's own `--option system-features` is a restricted setting the daemon
      # ignores from an untrusted user (extra-: NixOS' default features stay)
      extra-system-features = mkIf (features != [ ]) features;
    };

    environment.etc."circus/worker.toml".source = settingsFile;

    systemd.services.circus-worker = {
      description = "Circus remote build worker (Celery, builds through this host's Nix daemon)";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      requires = [ "nix-daemon.service" ];
      restartTriggers = [ settingsFile ];
      path = [ pkgs.nix ];
      environment = {
        CIRCUS_WORKER_CONFIG_FILE = "/etc/circus/worker.toml";
        NIX_REMOTE = "daemon";
      };
      serviceConfig = import ./hardening.nix // {
        Type = "simple";
        ExecStart = "${cfg.package}/bin/circus-worker";
        User = cfg.user;
        Group = cfg.user;
        StateDirectory = "circus-worker";
        StateDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM drains: Celery's warm shutdown stops the running builds (their process
        # groups) and hands their steps back to the server (POST /release, /leave), so
        # another host takes them at once. Only the worker gets SIGTERM (KillMode=mixed):
        # a nix-store signalled by systemd at the same moment could exit before the
        # worker marks its build stopped, and be reported as a failed build instead of
        # handed back. What is left when the worker has exited gets SIGKILL.
        KillSignal = "SIGTERM";
        KillMode = "mixed";
        TimeoutStopSec = 120;
      } // lib.optionalAttrs (writablePaths != [ ]) { ReadWritePaths = writablePaths; };
    };
  };
}
