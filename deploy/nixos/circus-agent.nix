# NixOS module: services.circus-agent — a Circus build agent that dials the queue
# runner's agent gateway (settings.queue_runner.rpc on the Circus host) and builds
# through this host's Nix daemon. The token is read from `tokenFile` at start and never
# copied into the Nix store; TLS keys likewise stay where they are.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.circus-agent;
  inherit (lib) mkOption mkEnableOption mkIf mkDefault types;

  settingsFormat = pkgs.formats.toml { };
  settingsFile = settingsFormat.generate "circus-agent.toml" cfg.settings;

  inlineToken = lib.attrByPath [ "agent" "auth_token" ] null cfg.settings != null;
  scheme = builtins.head (builtins.match "([a-z]*)://.*|.*" cfg.runnerUrl ++ [ null ]);
  optionalKey = name: value: lib.optionalAttrs (value != null) { ${name} = value; };
in
{
  options.services.circus-agent = {
    enable = mkEnableOption "the Circus build agent";

    package = mkOption {
      type = types.package;
      description = "The agent package (the flake's packages.<system>.circus-agent).";
    };

    user = mkOption {
      type = types.str;
      default = "circus-agent";
      description = "User the agent runs as; made a trusted user of the Nix daemon.";
    };

    runnerUrl = mkOption {
      type = types.str;
      example = "tls://ci.example.org:7000";
      description = "The gateway: tls://host:port (tcp:// only when the gateway allows plaintext).";
    };

    tokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "File holding the agent's bearer token (its SHA-256 is in the gateway's auth_tokens).";
    };

    oidcAudience = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Instead of tokenFile: present a GitHub Actions OIDC token for this audience.";
    };

    name = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Agent name shown by the server (default: the host name).";
    };

    systems = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "x86_64-linux" "i686-linux" ];
      description = "Systems this agent builds for (default: this host's).";
    };

    features = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "kvm" "big-parallel" ];
      description = "System features this host offers.";
    };

    maxJobs = mkOption {
      type = types.positiveInt;
      default = 1;
      description = "Builds run at once.";
    };

    tls = {
      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "CA bundle that verifies the gateway's certificate (default: system CAs).";
      };
      certFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Client certificate for mutual TLS.";
      };
      keyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Client key for mutual TLS (read at start, never copied to the store).";
      };
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      description = ''
        Further agent settings (the [agent] table of circus/agent/config.py), merged with
        the options above and rendered to /etc/circus/agent.toml. No secrets inline.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.tokenFile != null) != (cfg.oidcAudience != null);
        message = "services.circus-agent: set exactly one of tokenFile and oidcAudience";
      }
      {
        assertion = !inlineToken;
        message = "services.circus-agent: the token must be given by tokenFile, not "
          + "settings.agent.auth_token (it would be copied into the world-readable Nix store)";
      }
      {
        assertion = (cfg.tls.certFile != null) == (cfg.tls.keyFile != null);
        message = "services.circus-agent: tls.certFile and tls.keyFile must be set together";
      }
      {
        assertion = builtins.elem scheme [ "tls" "tcp" ];
        message = "services.circus-agent: runnerUrl must be tls://host:port or tcp://host:port";
      }
      {
        assertion = scheme != "tcp" || cfg.tokenFile == null;
        message = "services.circus-agent: a token over tcp:// would travel in clear; use tls://";
      }
    ];

    services.circus-agent.settings.agent = {
      runner_url = cfg.runnerUrl;
      max_jobs = mkDefault cfg.maxJobs;
      features = mkDefault cfg.features;
      work_dir = mkDefault "/var/lib/circus-agent";
    }
    // optionalKey "auth_token_file" cfg.tokenFile
    // optionalKey "oidc_audience" cfg.oidcAudience
    // optionalKey "name" cfg.name
    // optionalKey "systems" cfg.systems
    // {
      tls = optionalKey "ca_file" cfg.tls.caFile
        // optionalKey "cert_file" cfg.tls.certFile
        // optionalKey "key_file" cfg.tls.keyFile;
    };

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      home = "/var/lib/circus-agent";
      description = "Circus build agent";
    };
    users.groups.${cfg.user} = { };

    # the agent imports inputs and builds arbitrary derivations through the daemon
    nix.settings.trusted-users = [ cfg.user ];

    environment.etc."circus/agent.toml".source = settingsFile;

    systemd.services.circus-agent = {
      description = "Circus build agent (dials the queue runner's gateway)";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      requires = [ "nix-daemon.service" ];
      restartTriggers = [ settingsFile ];
      path = [ pkgs.nix pkgs.zstd pkgs.xz ];
      environment = {
        CIRCUS_AGENT_CONFIG_FILE = "/etc/circus/agent.toml";
        NIX_REMOTE = "daemon";
      };
      serviceConfig = import ./hardening.nix // {
        Type = "simple";
        ExecStart = "${cfg.package}/bin/circus-agent";
        User = cfg.user;
        Group = cfg.user;
        StateDirectory = "circus-agent";
        StateDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM drains: running builds finish (or are handed back), then the agent exits.
        # Only the agent gets it (mixed): a SIGTERM to its nix-store clients as well would
        # end the very builds it drains
        KillSignal = "SIGTERM";
        KillMode = "mixed";
        TimeoutStopSec = 3600;
      };
    };
  };
}
