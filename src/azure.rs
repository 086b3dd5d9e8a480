//! What the filter knows of Azure's names: the data-plane host suffixes of
//! the Azure AI services, which cloud and service each belongs to, and the
//! audience a token for it needs (AZURE_FACTS.md §2, §3). One table, read by
//! the configuration (default audiences), routing (near misses) and the
//! diagnoses (resource names in suggested commands).

/// A sovereign cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Public,
    UsGov,
    China,
}

/// The service a data-plane host belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Azure OpenAI and Cognitive Services (`*.openai.azure.com`, …).
    CognitiveServices,
    /// Azure AI Foundry (`*.services.ai.azure.com`): project paths take
    /// their own audience.
    Foundry,
    /// Azure ML managed online endpoints (`*.inference.ml.azure.com`).
    MachineLearning,
}

/// App ID URIs of the audiences the filter knows.
pub mod audience {
    pub const COGNITIVE_SERVICES: &str = "https://cognitiveservices.azure.com";
    pub const COGNITIVE_SERVICES_US: &str = "https://cognitiveservices.azure.us";
    pub const COGNITIVE_SERVICES_CN: &str = "https://cognitiveservices.azure.cn";
    pub const AZURE_ML: &str = "https://ml.azure.com";
    pub const FOUNDRY: &str = "https://ai.azure.com";
}

/// Data-plane host suffixes of the Azure AI services, every cloud.
pub const HOSTS: [(&str, Cloud, Service); 8] = [
    (
        ".openai.azure.com",
        Cloud::Public,
        Service::CognitiveServices,
    ),
    (
        ".cognitiveservices.azure.com",
        Cloud::Public,
        Service::CognitiveServices,
    ),
    (".services.ai.azure.com", Cloud::Public, Service::Foundry),
    (
        ".inference.ml.azure.com",
        Cloud::Public,
        Service::MachineLearning,
    ),
    (".openai.azure.us", Cloud::UsGov, Service::CognitiveServices),
    (
        ".cognitiveservices.azure.us",
        Cloud::UsGov,
        Service::CognitiveServices,
    ),
    (".openai.azure.cn", Cloud::China, Service::CognitiveServices),
    (
        ".cognitiveservices.azure.cn",
        Cloud::China,
        Service::CognitiveServices,
    ),
];

/// The row of [`HOSTS`] whose suffix `host` ends with (ASCII case ignored),
/// and what precedes the suffix (empty names match nothing).
pub fn host(host: &str) -> Option<(&str, Cloud, Service)> {
    HOSTS.iter().find_map(|(suffix, cloud, service)| {
        let cut = host.len().checked_sub(suffix.len()).filter(|c| *c > 0)?;
        let (name, tail) = (host.get(..cut)?, host.get(cut..)?);
        tail.eq_ignore_ascii_case(suffix)
            .then_some((name, *cloud, *service))
    })
}

/// The cloud of any host under a sovereign cloud's domain (`*.azure.us`,
/// `*.azure.cn`), for hosts the table does not list.
pub fn sovereign_cloud(host: &str) -> Option<Cloud> {
    let lower = host.to_ascii_lowercase();
    if lower.ends_with(".azure.us") {
        Some(Cloud::UsGov)
    } else if lower.ends_with(".azure.cn") {
        Some(Cloud::China)
    } else {
        None
    }
}

impl Cloud {
    /// The cloud of an Entra authority host, if it is one of the three.
    pub fn of_authority(authority: &str) -> Option<Cloud> {
        match authority.to_ascii_lowercase().as_str() {
            "login.microsoftonline.com" => Some(Cloud::Public),
            "login.microsoftonline.us" => Some(Cloud::UsGov),
            "login.chinacloudapi.cn" => Some(Cloud::China),
            _ => None,
        }
    }

    /// The Entra authority host of this cloud.
    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Public => "login.microsoftonline.com",
            Cloud::UsGov => "login.microsoftonline.us",
            Cloud::China => "login.chinacloudapi.cn",
        }
    }

    /// The cloud of an Azure audience URI, if it is an Azure one.
    pub fn of_audience(resource: &str) -> Option<Cloud> {
        let host = resource
            .strip_prefix("https://")?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if host.ends_with(".azure.us") || host.ends_with(".usgovcloudapi.net") {
            Some(Cloud::UsGov)
        } else if host.ends_with(".azure.cn") || host.ends_with(".chinacloudapi.cn") {
            Some(Cloud::China)
        } else if host.ends_with(".azure.com") {
            Some(Cloud::Public)
        } else {
            None
        }
    }

    /// Azure OpenAI's audience in this cloud (public when unknown).
    pub fn audience(cloud: Option<Cloud>) -> &'static str {
        match cloud {
            Some(Cloud::UsGov) => audience::COGNITIVE_SERVICES_US,
            Some(Cloud::China) => audience::COGNITIVE_SERVICES_CN,
            Some(Cloud::Public) | None => audience::COGNITIVE_SERVICES,
        }
    }

    /// The cloud in words.
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Public => "the public cloud",
            Cloud::UsGov => "Azure US Government",
            Cloud::China => "Azure China",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_found_by_suffix_with_the_name_before_it() {
        assert_eq!(
            host("MyRes.OpenAI.azure.com"),
            Some(("MyRes", Cloud::Public, Service::CognitiveServices))
        );
        assert_eq!(host("gov.openai.azure.us").map(|h| h.1), Some(Cloud::UsGov));
        assert_eq!(
            host("ep.eastus.inference.ml.azure.com").map(|h| h.2),
            Some(Service::MachineLearning)
        );
        assert_eq!(host(".openai.azure.com"), None);
        assert_eq!(host("openai.azure.com.evil.example"), None);
        assert_eq!(sovereign_cloud("x.search.azure.us"), Some(Cloud::UsGov));
    }

    #[test]
    fn each_cloud_has_its_authority_and_audience() {
        for cloud in [Cloud::Public, Cloud::UsGov, Cloud::China] {
            assert_eq!(Cloud::of_authority(cloud.authority()), Some(cloud));
            assert_eq!(
                Cloud::of_audience(Cloud::audience(Some(cloud))),
                Some(cloud)
            );
        }
    }
}
